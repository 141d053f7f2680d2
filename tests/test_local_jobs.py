"""Jobs on this machine through `launcher submit --cluster local`: the README's main command."""

import json
import subprocess
import time

import pytest

from tests.conftest import RECIPES, run_launcher
from tests.trainer_helpers import job_processes

pytest.importorskip("megatron.core")


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A private job store and run root for each test."""
    profile = tmp_path / "local.yaml"
    profile.write_text(f"backend: local\ngpus_per_node: 0\ngpu_memory_gib: 16\nrun_root: {tmp_path / 'runs'}\n")
    env = {"MOE_LAUNCHER_HOME": str(tmp_path / "home")}
    return tmp_path, str(profile), env


def test_submit_wait_trains_and_reports(home):
    tmp_path, profile, env = home
    rc, out, err = run_launcher("submit", RECIPES / "tiny_moe.yaml", "--cluster", profile, "--wait", "--json",
                                "trainer.total_training_steps=20", env=env, timeout=300)
    assert rc == 0, err
    result = json.loads(out.splitlines()[-1])
    assert result["state"] == "COMPLETED" and result["exit_code"] == 0
    run_dir = tmp_path / "runs" / "tiny_moe"
    assert result["run_dir"] == str(run_dir)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == 20 and losses[-1] < losses[0] - 1.0
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_000020"
    rc, out, _ = run_launcher("status", result["job_id"], "--json", env=env)
    status = json.loads(out)
    assert rc == 0 and status["state"] == "COMPLETED" and (status["step"], status["total_steps"]) == (20, 20)
    assert status["loss"] == losses[-1] and status["eta_s"] is None and status["elapsed_s"] > 0
    assert status["val_loss"] == [m for m in metrics if "val_loss" in m][-1]["val_loss"]
    assert status["last_checkpoint"] == str(run_dir / "checkpoints" / "step_000020")
    rc, out, _ = run_launcher("status", result["job_id"], env=env)
    assert f"step         20/20, loss {losses[-1]:.4f}, validation loss" in out
    rc, out, _ = run_launcher("logs", result["job_id"], env=env)
    assert "done: 20 steps" in out
    rc, out, _ = run_launcher("list", env=env)
    assert result["job_id"] in out and "COMPLETED" in out and "20/20" in out
    (listed,) = json.loads(run_launcher("list", "--json", "--name", "tiny", env=env)[1])
    assert (listed["job_id"], listed["state"], listed["step"]) == (result["job_id"], "COMPLETED", 20)
    assert json.loads(run_launcher("list", "--json", "--state", "running", env=env)[1]) == []
    assert {m["job_id"] for m in metrics} == {result["job_id"]}
    # the report: every plot written, the summary's numbers those of metrics.jsonl
    rc, out, err = run_launcher("report", result["job_id"], env=env, timeout=120)
    assert rc == 0, err
    report = run_dir / "report"
    for name in ("loss.png", "optimizer.png", "throughput.png", "expert_share.png", "expert_imbalance.png",
                 "aux_loss.png", "summary.md", "report.html"):
        assert (report / name).stat().st_size > 1000 or name.endswith((".md", ".html")), name
    text = (report / "summary.md").read_text()
    assert f"| final loss | {losses[-1]:.4f} |" in text and "| steps | 1 to 20 (20) |" in text
    for layer in ("layer_0", "layer_1"):
        totals = [sum(col) for col in zip(*(m["tokens_per_expert"][layer] for m in metrics if "loss" in m))]
        assert f"| {max(totals) / (sum(totals) / len(totals)):.2f} |" in text.split(f"| {layer} |")[1].splitlines()[0]
    assert 'src="expert_share.png"' in (report / "report.html").read_text()


def test_submitting_again_trains_only_what_is_left_and_reports_only_itself(home):
    """Every submission of a recipe shares its run directory: a finished run trains nothing
    and appends nothing; a longer one resumes; each summary speaks of its own steps only."""
    tmp_path, profile, env = home
    run_dir = tmp_path / "runs" / "tiny_moe"
    submit = ("submit", RECIPES / "tiny_moe.yaml", "--cluster", profile, "--wait", "data.val_files=[]")
    rc, out, err = run_launcher(*submit, "trainer.total_training_steps=4", env=env, timeout=300)
    assert rc == 0 and "over 4 steps" in out, err
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    rc, out, err = run_launcher(*submit, "trainer.total_training_steps=4", env=env, timeout=300)
    assert rc == 0 and "COMPLETED" in out and "this job trained no steps" in out and "loss" not in out
    assert (run_dir / "metrics.jsonl").read_text().splitlines() == lines
    job_id = out.split()[2]
    assert "run already complete: its checkpoint is at step 4 of 4" in run_launcher("logs", job_id, env=env)[1]
    rc, out, err = run_launcher(*submit, "trainer.total_training_steps=6", env=env, timeout=300)
    assert rc == 0 and "over 2 steps (5 to 6)" in out, out + err
    jobs = run_launcher("list", env=env)[1]
    # another learning rate is another run: refused before anything is queued, naming the key
    rc, out, err = run_launcher(*submit, "trainer.total_training_steps=8", "optim.lr=0.5", env=env, timeout=60)
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "step_000006 was trained with another recipe: optim.lr: 0.003 -> 0.5" in err and "job.name" in err
    assert run_launcher("list", env=env)[1] == jobs
    # --restart starts over in the same run directory, the old run moved aside whole
    rc, out, err = run_launcher(*submit, "--restart", "trainer.total_training_steps=2", "optim.lr=0.5", env=env,
                                timeout=300)
    assert rc == 0 and "over 2 steps\n" in out, out + err
    (old_checkpoints,) = run_dir.glob("checkpoints.before-*")
    (old_metrics,) = run_dir.glob("metrics.jsonl.before-*")
    assert (old_checkpoints / "latest").read_text().strip() == "step_000006"
    assert len([line for line in old_metrics.read_text().splitlines() if '"loss"' in line]) == 6
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_000002"


def test_failed_job_exits_1_with_log_tail(home, tmp_path):
    _, profile, env = home
    rc, out, err = run_launcher("submit", RECIPES / "tiny_moe.yaml", "--cluster", profile, "--wait",
                                f"data.train_files={tmp_path / 'missing.parquet'}", env=env, timeout=300)
    assert rc == 1
    assert "FAILED (exit code 1)" in out  # torchrun's exit code when a worker fails
    assert "the job said: error: " in out and "missing.parquet: no such data file" in out
    job_id = out.split()[2]
    status = json.loads(run_launcher("status", job_id, "--json", env=env)[1])
    assert status["state"] == "FAILED" and "missing.parquet: no such data file" in status["last_error"]
    assert "error        " in run_launcher("status", job_id, env=env)[1]


def test_cancel(home):
    _, profile, env = home
    rc, out, err = run_launcher("submit", RECIPES / "tiny_moe.yaml", "--cluster", profile, "--json",
                                "trainer.total_training_steps=100000", env=env)
    job_id, run_dir = (json.loads(out.splitlines()[-1])[k] for k in ("job_id", "run_dir"))
    deadline = time.time() + 120
    status = {}
    while time.time() < deadline and (status.get("step") or 0) < 2:
        time.sleep(1)
        status = json.loads(run_launcher("status", job_id, "--json", env=env)[1])
    # a running job's progress: steps of the total, speed, time so far and to go
    assert status["state"] == "RUNNING" and status["total_steps"] == 100000 and status["step"] >= 2
    assert status["tokens_per_s"] > 0 and status["eta_s"] > 1000 and status["elapsed_s"] > 0
    (listed,) = json.loads(run_launcher("list", "--json", "--state", "running", env=env)[1])
    assert listed["job_id"] == job_id
    # --watch: one refresh after another, as long as the job runs (ended here by the timeout)
    with pytest.raises(subprocess.TimeoutExpired) as watched:
        run_launcher("status", job_id, "--watch", "1", env=env, timeout=4)
    out = watched.value.stdout or b""
    assert (out.decode() if isinstance(out, bytes) else out).count("state        RUNNING") >= 2
    assert len(job_processes(run_dir)) >= 3  # torchrun, its 2 ranks (and their data workers)
    rc, out, _ = run_launcher("cancel", job_id, env=env, timeout=60)
    assert rc == 0
    assert json.loads(run_launcher("status", job_id, "--json", env=env)[1])["state"] == "CANCELLED"
    deadline = time.time() + 30  # nothing of the job keeps running (on a GPU node: holding its memory)
    while job_processes(run_dir) and time.time() < deadline:
        time.sleep(0.5)
    assert not job_processes(run_dir)


def test_unknown_job_is_one_line(home):
    _, _, env = home
    rc, out, err = run_launcher("status", "12345", env=env)
    assert rc == 2 and err.startswith("error: job 12345: not in the job store") and "Traceback" not in err


def test_follow_streams_the_log(home, tmp_path):
    _, profile, env = home
    rc, out, _ = run_launcher("submit", RECIPES / "tiny_moe.yaml", "--cluster", profile, "--follow",
                              f"data.train_files={tmp_path / 'missing.parquet'}", env=env, timeout=300)
    assert rc == 1
    assert "=== moe-launcher local job started" in out and "missing.parquet: no such data file" in out


def test_store_survives_concurrent_launchers(tmp_path):
    """Eight processes recording jobs at once lose none of them."""
    import subprocess
    import sys

    script = ("import sys; from pathlib import Path; from launcher.store import JobStore, JobRecord\n"
              "store = JobStore(Path(sys.argv[1]))\n"
              "for i in range(25):\n"
              "    store.add(JobRecord(f'{sys.argv[2]}-{i}', 'local', 'c', 'n', '/r', float(i), {}))\n")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "jobs.sqlite"), str(k)])
             for k in range(8)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    from launcher.store import JobStore

    assert len(JobStore(tmp_path / "jobs.sqlite").recent(1000)) == 200
