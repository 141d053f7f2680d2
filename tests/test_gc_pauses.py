"""The collector's time is counted for the step records, and setup's objects leave its walks."""

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
