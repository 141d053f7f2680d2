"""Jobs on a real Slurm 22.05 cluster of two nodes on this machine (clusters/slurm-local.sh),
with and without accounting (sacct, or squeue --json and the job's own files)."""

import json
import os
import shutil
import signal
import subprocess
import time

import pytest

from launcher.backends.slurm import _sacct
from launcher.cluster import load_cluster
from launcher.store import JobStore
from tests.conftest import REPO, RECIPES, run_launcher
from tests.trainer_helpers import training_processes

SCRIPT = REPO / "clusters" / "slurm-local.sh"
pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("apt-get"),
                                reason="the local Slurm cluster needs root and Debian's packages")


def start(*options):
    done = subprocess.run(["bash", str(SCRIPT), "start", *options], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"slurm-local.sh start {' '.join(options)} failed:\n{done.stdout}{done.stderr}"


@pytest.fixture
def slurm(tmp_path):
    """A private run root, job store and cluster profile (python may be replaced by a stand-in)."""
    def profile(python="python3", requeue=True, gpus=0):
        path = tmp_path / f"slurm-{python.replace('/', '_')}-{gpus}.yaml"
        text = (REPO / "clusters" / "slurm-local.yaml").read_text()
        text = text.replace("run_root: /tmp/moe-runs", f"run_root: {tmp_path / 'runs'}")
        text = text.replace("python: python3", f"python: {python}")
        text = text.replace("requeue: true", f"requeue: {'true' if requeue else 'false'}")
        if gpus:
            text = text.replace("gpus_per_node: 0", f"gpus_per_node: {gpus}\ngpu_memory_gib: 80") \
                       .replace("gpu_memory_gib: 8\n", "")
        path.write_text(text)
        return str(path)

    def stand_in(body: str) -> str:
        path = tmp_path / f"python-{abs(hash(body))}.sh"
        path.write_text("#!/bin/bash\n" + body + "\n")
        path.chmod(0o755)
        return str(path)

    env = {"MOE_LAUNCHER_HOME": str(tmp_path / "home"), "SLURM_CONF": "/tmp/moe-slurm/slurm.conf"}
    return profile, stand_in, env


def submit(env, profile, *overrides, wait=True, timeout=600):
    args = ["submit", RECIPES / "tiny_moe.yaml", "--cluster", profile, "--json", *overrides]
    rc, out, err = run_launcher(*args, *(["--wait"] if wait else []), env=env, timeout=timeout)
    return rc, json.loads(out.splitlines()[-1]) if out.strip() else None, out, err


def status(env, job_id):
    return json.loads(run_launcher("status", job_id, "--json", env=env)[1])


TWO_NODES = ["trainer.nnodes=2", "trainer.n_gpus_per_node=1", "megatron.expert_model_parallel_size=2"]


@pytest.mark.parametrize("cluster", ["without accounting", "with accounting"], indirect=True)
class TestJobs:
    @pytest.fixture(autouse=True, scope="class")
    def cluster(self, request):
        start(*(["--accounting"] if request.param == "with accounting" else []))
        return request.param

    def test_two_node_job_trains_and_checkpoints(self, slurm, tmp_path):
        profile, _, env = slurm
        rc, result, out, err = submit(env, profile(), *TWO_NODES, "trainer.total_training_steps=8")
        assert rc == 0, out + err
        assert (result["state"], result["exit_code"]) == ("COMPLETED", 0)
        run_dir = tmp_path / "runs" / "tiny_moe"
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert len([m for m in metrics if "loss" in m]) == 8
        assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_000008"
        log = (run_dir / "logs" / f"slurm-{result['job_id']}.out").read_text()
        assert f"job {result['job_id']} restart 0" in log
        # once the controller forgets the job, its own files still tell how it ended
        backend_status = _status_from_files(env, result["job_id"])
        assert (backend_status.state, backend_status.exit_code) == ("COMPLETED", 0)

    def test_failed_job_reports_exit_code_and_log(self, slurm, cluster):
        profile, stand_in, env = slurm
        python = stand_in('echo "error: the stand-in trainer failed on $(hostname)"; exit 3')
        rc, result, out, err = submit(env, profile(python), "job.max_restarts=0")
        assert rc == 1 and (result["state"], result["exit_code"]) == ("FAILED", 3)
        if cluster == "with accounting":  # the backend reads sacct there
            from_sacct = None
            for _ in range(30):  # slurmdbd records the end of a job a moment after the controller
                from_sacct = _sacct(load_cluster(profile()), result["job_id"])
                if from_sacct and from_sacct.finished:
                    break
                time.sleep(1)
            assert (from_sacct.state, from_sacct.exit_code) == ("FAILED", 3)
        rc, out, _ = run_launcher("submit", RECIPES / "tiny_moe.yaml", "--cluster", profile(python), "--wait",
                                  "job.max_restarts=0", env=env, timeout=300)
        assert rc == 1 and "the job said: error: the stand-in trainer failed" in out

    def test_cancelled_job(self, slurm):
        profile, stand_in, env = slurm
        rc, result, _, _ = submit(env, profile(stand_in("sleep 300")), wait=False)
        job_id = result["job_id"]
        _wait_for(env, job_id, "RUNNING")
        assert run_launcher("cancel", job_id, env=env)[0] == 0
        assert _wait_for(env, job_id, "CANCELLED")["state"] == "CANCELLED"

    def test_job_over_its_time_limit_reads_timeout(self, slurm, cluster):
        if cluster == "without accounting":  # a 90 s wait; TIMEOUT is read as FAILED and CANCELLED are, in both
            pytest.skip("runs with accounting only")
        profile, stand_in, env = slurm
        rc, result, _, _ = submit(env, profile(stand_in("sleep 600"), requeue=False), "job.time_limit=00:01:00",
                                  timeout=400)
        assert rc == 1 and result["state"] == "TIMEOUT"

    def test_slurm_that_does_not_answer_is_one_line(self, slurm, tmp_path):
        profile, _, env = slurm
        rc, result, _, _ = submit(env, profile(), "trainer.total_training_steps=1", wait=False)
        conf = tmp_path / "dead.conf"
        conf.write_text(open("/tmp/moe-slurm/slurm.conf").read().replace("SlurmctldPort=16817", "SlurmctldPort=16999")
                        .replace("AccountingStoragePort=16820", "AccountingStoragePort=16998"))
        dead = tmp_path / "dead.yaml"
        dead.write_text(open(JobStore(tmp_path / "home" / "jobs.sqlite").get(result["job_id"]).cluster).read()
                        .replace("/tmp/moe-slurm/slurm.conf", str(conf)))
        store = JobStore(tmp_path / "home" / "jobs.sqlite")
        record = store.get(result["job_id"])
        record.cluster = str(dead)
        store.add(record)
        rc, out, err = run_launcher("status", result["job_id"], env={**env, "SLURM_CONF": str(conf)}, timeout=120)
        assert rc == 2 and err.startswith("error: squeue: ") and "Traceback" not in err


def test_gpu_script_is_accepted_by_a_fake_gpu_cluster(slurm, tmp_path):
    start("--gpus")
    profile, _, env = slurm
    out_dir = tmp_path / "rendered"
    rc, out, err = run_launcher("render", RECIPES / "tiny_moe.yaml", "--cluster", profile(gpus=2), "-o", out_dir,
                                "trainer.nnodes=2", "trainer.n_gpus_per_node=2", env=env)
    assert rc == 0, err
    script = out_dir / "tiny_moe.sbatch"
    assert "#SBATCH --gpus-per-node=2" in script.read_text()
    proc = subprocess.run(["sbatch", "--test-only", str(script)], capture_output=True, text=True,
                          env={**os.environ, "SLURM_CONF": "/tmp/moe-slurm/slurm.conf"})
    assert proc.returncode == 0 and "to start at" in proc.stderr, proc.stderr


def _status_from_files(env, job_id):
    from launcher.backends import backend_for

    record = JobStore(__import__("pathlib").Path(env["MOE_LAUNCHER_HOME"]) / "jobs.sqlite").get(job_id)
    return backend_for(load_cluster(record.cluster))._from_files(record)


def _wait_for(env, job_id, state, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        current = status(env, job_id)
        if current["state"] == state:
            return current
        time.sleep(1)
    raise AssertionError(f"job {job_id} never reached {state}: {current}")


def _losses_by_step(run_dir):
    from launcher.progress import read_records

    records = read_records(run_dir / "metrics.jsonl", None)
    last = {r["step"]: r for r in records if "loss" in r}  # a requeued attempt redoes steps after its checkpoint
    return [last[step]["loss"] for step in sorted(last)], max((r.get("restart", 0) for r in last.values()), default=0)


def _wait_for_step(run_dir, step, timeout=300, attempt=0):
    """Until the job's attempt number `attempt` (its restart count) has logged `step`."""
    from launcher.progress import read_records

    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run_dir / "metrics.jsonl").exists() and any(
                r.get("restart", 0) == attempt and r["step"] >= step
                for r in read_records(run_dir / "metrics.jsonl", None) if "loss" in r):
            return
        time.sleep(0.5)
    raise AssertionError(f"{run_dir} never reached step {step} in attempt {attempt}")


def test_a_job_requeued_and_then_losing_a_rank_resumes_with_an_uninterrupted_runs_losses(slurm, tmp_path):
    """On two nodes, one job: `scontrol requeue` mid-run, then, in the attempt that follows, one
    training process killed with SIGKILL (a dead rank) - each attempt goes on from the latest
    checkpoint, and the per-step losses are those of a run never interrupted. The dead rank
    ends its attempt within a minute, the job requeues itself (job.max_restarts) and `launcher
    status` names the rank, host and signal."""
    start()
    profile, stand_in, env = slurm
    common = [*TWO_NODES, "trainer.total_training_steps=10", "trainer.save_freq=2", "data.val_files=[]"]
    rc, result, out, err = submit(env, profile(), *common, "job.name=clean")
    assert rc == 0, out + err
    clean, _ = _losses_by_step(tmp_path / "runs" / "clean")

    rc, result, _, _ = submit(env, profile(), *common, "job.name=interrupted", wait=False)
    run_dir = tmp_path / "runs" / "interrupted"
    _wait_for_step(run_dir, 3)  # the step-2 checkpoint is written by then
    subprocess.run(["scontrol", "requeue", result["job_id"]], env={**os.environ, **env}, check=True)
    _wait_for_step(run_dir, 5, attempt=1)  # the requeued attempt has written its step-4 checkpoint
    workers = training_processes(f"{run_dir}/recipe.yaml")
    assert len(workers) == 2, workers  # one training process per node
    os.kill(workers[1], signal.SIGKILL)
    killed = time.time()
    log = run_dir / "logs" / f"slurm-{result['job_id']}.out"
    # (measured: 3 s; 61 s while megatron's checkpoint writer kept the dead rank's output open)
    while "attempt 1 failed with exit code" not in log.read_text(errors="replace"):
        assert time.time() - killed < 60, log.read_text()[-3000:]
        time.sleep(0.5)
    final = _wait_for(env, result["job_id"], "COMPLETED", timeout=400)
    losses, restarts = _losses_by_step(run_dir)
    assert restarts == 2 and final["restarts"] == 2
    assert "SIGKILL" in final["rank_failure"] and "attempt 1" in final["rank_failure"]
    assert losses == pytest.approx(clean, rel=1e-6)
    rc, text, _ = run_launcher("status", result["job_id"], env=env)
    assert "failed rank  rank " in text and "SIGKILL" in text


def test_bad_input_is_not_retried(slurm, tmp_path):
    """The trainer leaves BAD_INPUT when it exits for bad input: the job fails at once instead of
    going again job.max_restarts times."""
    start()
    profile, stand_in, env = slurm
    python = stand_in('for a in "$@"; do [ "${prev:-}" = --config ] && dir=$(dirname "$a"); prev=$a; done\n'
                      'echo "error: data.train_files: no such file"; touch "$dir/BAD_INPUT"; exit 2')
    rc, result, out, err = submit(env, profile(python))
    assert rc == 1 and (result["state"], result["exit_code"]) == ("FAILED", 2)
    log = (tmp_path / "runs" / "tiny_moe" / "logs" / f"slurm-{result['job_id']}.out").read_text()
    assert "requeueing" not in log and log.count("=== moe-launcher job") == 1
