"""Preemption: the trainer killed with SIGKILL during its checkpoint saves, again and again,
never leaves `latest` naming a checkpoint that is incomplete or damaged, and the run that
finishes after all the kills has the per-step losses of a run never killed."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO
from tests.trainer_helpers import losses, recipe_processes, train, write_recipe

pytest.importorskip("megatron.core")

KILLS, STEPS = 8, 20
COMMON = ("megatron.expert_model_parallel_size=1", "data.val_files=[]", "trainer.save_freq=1",
          f"trainer.total_training_steps={STEPS}", "trainer.n_gpus_per_node=1")


def start(run_dir, config):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
                             "-m", "trainer", "--config", str(config)], cwd=run_dir, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def wait_until_gone(config, timeout: float = 30.0) -> None:
    """Wait until no process of the killed run is left: torchrun is reaped at once, but its rank
    ends only when the parent-death signal reaches it, and the rank's forked checkpoint writers
    only when the rank has finished dying; until then they still write into step_N.tmp, which
    the next run would take for a save of its own. A scheduler restarts a job only after all
    its processes are gone (a Slurm step's cgroup, a pod), and so does this test."""
    deadline = time.monotonic() + timeout
    while True:
        left = sorted(recipe_processes(str(config)))
        if not left:
            return
        assert time.monotonic() < deadline, f"processes {left} of the killed run still running after {timeout} s"
        time.sleep(0.01)


def kill_during_a_save(proc, checkpoints, config, saves_first: int, delay: float) -> bool:
    """Let `saves_first` saves finish, then SIGKILL the trainer `delay` seconds after the next
    one starts (its step_N.tmp appears); False if the run finished first. A step_N.tmp that an
    earlier kill left behind is no save of this run (the trainer replaces it when it saves
    step N): only folders made after the start count."""
    def unfinished():
        found = set()
        for path in checkpoints.glob("step_*.tmp"):
            try:
                info = path.stat()
            except FileNotFoundError:  # removed meanwhile
                continue
            found.add((path.name, info.st_ino, info.st_ctime_ns))
        return found

    left_behind = unfinished()
    seen, saving = 0, False
    while proc.poll() is None:
        now = bool(unfinished() - left_behind)
        if now and not saving:
            if seen == saves_first:
                time.sleep(delay)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                wait_until_gone(config)
                return True
            seen += 1
        saving = now
        time.sleep(0.001)
    return False


def test_sigkill_during_saves_never_breaks_latest_and_losses_match(tmp_path):
    from trainer.checkpoint import damage, latest

    _, _, clean = train(tmp_path / "clean", *COMMON, nproc=1)
    run_dir = tmp_path / "killed"
    config = write_recipe(run_dir, *COMMON)
    checkpoints = run_dir / "checkpoints"
    rng = random.Random(0)
    kills, reached, mid_save = 0, [], 0
    while kills < KILLS:
        proc = start(run_dir, config)
        if not kill_during_a_save(proc, checkpoints, config, rng.randrange(2), rng.uniform(0.0, 0.1)):
            break  # the run finished before another kill
        kills += 1
        mid_save += any(p.name.endswith(".tmp") for p in checkpoints.glob("step_*"))  # left half-written
        pointed = latest(checkpoints)
        if (checkpoints / "latest").exists():
            assert pointed is not None and not pointed.name.endswith(".tmp")
            assert damage(pointed) is None, f"kill {kills}: latest {pointed} is damaged: {damage(pointed)}"
            reached.append(pointed.name)
    # kills spread over many saves, most of them inside one
    assert kills == KILLS and len(set(reached)) >= KILLS // 2 and mid_save >= KILLS // 2, (reached, mid_save)
    proc = start(run_dir, config)
    assert proc.wait(timeout=300) == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = {r["step"]: r["loss"] for r in records if "loss" in r}  # a step trained again: its last record
    assert sorted(last) == list(range(1, STEPS + 1))
    assert [last[s] for s in sorted(last)] == pytest.approx(losses(clean), rel=1e-6)


def pod_command(tmp_path, run_dir, config):
    """The Kubernetes pod's own command and environment, from the rendered PyTorchJob, pointed at
    this machine: its recipe and run directory here, torchrun's PET_* variables as the training
    operator sets them for one node."""
    import socket

    import yaml

    from tests.conftest import RECIPES, run_launcher

    rc, _, err = run_launcher("render", RECIPES / "tiny_moe.yaml", "--cluster", "k8s", "-o", tmp_path / "spec")
    assert rc == 0, err
    job = yaml.safe_load((tmp_path / "spec" / "pytorchjob.yaml").read_text())
    container = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    pod_run_dir = next(e["value"] for e in container["env"] if e["name"] == "MOE_RUN_DIR")
    local = {"/etc/moe-launcher/recipe.yaml": str(config), pod_run_dir: str(run_dir), "python": sys.executable}
    command = [local.get(part, part) for part in container["command"]]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, **{e["name"]: local.get(e["value"], e["value"]) for e in container["env"]},
           "PET_NNODES": "1", "PET_NODE_RANK": "0", "PET_NPROC_PER_NODE": "1", "PET_MASTER_ADDR": "127.0.0.1",
           "PET_MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return command, env


def test_eviction_saves_exits_0_and_the_restarted_pod_resumes(tmp_path):
    """Kubernetes eviction: SIGTERM to the pod's first process (the rendered manifest's command)
    makes the trainer finish its step, save and stop; the pod exits 0, well inside its grace
    period; the restarted pod resumes there and ends with an uninterrupted run's losses."""
    from trainer.checkpoint import damage, latest

    common = ("megatron.expert_model_parallel_size=1", "data.val_files=[]", "trainer.save_freq=-1",
              "trainer.total_training_steps=12", "trainer.n_gpus_per_node=1")
    _, _, clean = train(tmp_path / "clean", *common, nproc=1)
    run_dir = tmp_path / "evicted"
    config = write_recipe(run_dir, *common)
    command, env = pod_command(tmp_path, run_dir, config)
    proc = subprocess.Popen(command, cwd=run_dir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    signalled = time.time()
    os.kill(proc.pid, signal.SIGTERM)  # the kubelet signals the container's first process only
    assert proc.wait(timeout=60) == 0, proc.stderr.read()[-3000:]
    assert time.time() - signalled < 30  # the manifest gives 300 s (terminationGracePeriodSeconds)
    assert "SIGTERM: asking the trainer to checkpoint and stop" in proc.stderr.read()
    saved = latest(run_dir / "checkpoints")
    stopped_at = int(saved.name.split("_")[1])
    assert 3 <= stopped_at < 12 and damage(saved) is None
    restarted = subprocess.run(command, cwd=run_dir, env=env, capture_output=True, text=True, timeout=300)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    last = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert [last[s] for s in sorted(last)] == pytest.approx(losses(clean), rel=1e-6)