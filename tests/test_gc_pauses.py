"""The collector's time is counted for the step records (the slowest rank's), and setup's objects
leave its walks."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# In a process of its own: freezing is for the life of a process.
CHECK = """
import gc
from trainer.gc_pauses import GcPauses, freeze_setup
held = [[i] for i in range(200_000)]  # a model's worth of long-lived objects
pauses = GcPauses()
freeze_setup()
assert gc.get_freeze_count() > 200_000, gc.get_freeze_count()
pauses.take()
cycle = []
cycle.append(cycle)
del cycle
assert gc.collect() >= 1  # a cycle made after setup is still freed
assert pauses.take() > 0 and pauses.take() == 0
pauses.close()
gc.collect()
assert pauses.take() == 0  # closed: no longer counting
print("ok")
"""


def test_setup_is_frozen_garbage_is_still_freed_and_pauses_are_counted():
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=60,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "ok", out.stderr


AGREE = """
import sys
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp


def rank(r, run_dir, init):
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=r, world_size=2)
    from trainer.loop import agree_between_steps
    print(r, agree_between_steps(Path(run_dir), False, [0.002, 0.4][r]), agree_between_steps(Path(run_dir), r == 1, 0.0),
          flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(rank, args=(sys.argv[1], sys.argv[2]), nprocs=2)
"""


def test_every_rank_logs_the_slowest_ranks_pause_and_stops_with_any(tmp_path):
    """Rank 0 writes the metrics, but a pause of rank 1 holds both: each step's gc_pause_s is
    the largest of the ranks', agreed in the same exchange that stops every rank with one."""
    script = tmp_path / "agree.py"
    script.write_text(AGREE)
    out = subprocess.run([sys.executable, str(script), str(tmp_path), str(tmp_path / "init")], capture_output=True,
                         text=True, timeout=120, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert sorted(out.stdout.split("\n")[:2]) == ["0 (False, 0.4) (True, 0.0)", "1 (False, 0.4) (True, 0.0)"], out.stderr
