"""Slurm: an sbatch script that runs torchrun on every node through one srun; sbatch, sacct or
squeue, and scancel behind the Backend interface."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

from launcher.backends.base import Backend, JobStatus, write_files
from launcher.errors import UserError
from launcher.job import HEREDOC, Job, layout_text
from launcher.render import render_template
from launcher.store import JobRecord, now

# Options newer than some Slurm releases still in service: (first version, option).
# The cluster profile's slurm.version decides whether the script may use them.
OOM_KILL_STEP_SINCE = (24, 11)


def slurm_version(text: str, source: str) -> tuple[int, int]:
    try:
        major, minor = text.split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        raise UserError(f"{source}: slurm.version: '{text}' is not a Slurm release such as 22.05 or 24.11") from None


class SlurmBackend(Backend):
    name = "slurm"

    def render(self, job: Job) -> dict[str, str]:
        cluster = self.cluster
        if HEREDOC in job.recipe_yaml:
            raise UserError(f"{job.recipe_source}: the recipe may not contain the line {HEREDOC}")
        cpus = cluster.cpus_per_node if cluster.slurm.exclusive else max(1, job.nproc_per_node)
        run_root = job.run_dir.rsplit("/", 1)[0]
        mounts = [f"{run_root}:{run_root}", *cluster.container.mounts]
        script = render_template(
            "slurm.sbatch.j2",
            job=job,
            slurm=cluster.slurm,
            container=cluster.container,
            gpus_per_node=0 if cluster.on_cpu else job.nproc_per_node,
            cpus_per_task=min(cpus, cluster.cpus_per_node),
            log_file=f"{job.run_dir}/logs/slurm-%j.out",
            heredoc=HEREDOC,
            mounts=mounts,
            oom_kill_step=slurm_version(cluster.slurm.version, cluster.source) >= OOM_KILL_STEP_SINCE,
            layout_text=layout_text(job),
        )
        return {f"{job.name}.sbatch": script, "recipe.yaml": job.recipe_yaml}

    # Submit, follow and cancel through the Slurm client commands.

    def submit(self, job: Job, files: dict[str, str]) -> JobRecord:
        run_dir = Path(job.run_dir)
        script_name = next(name for name in files if name.endswith(".sbatch"))
        write_files(files, run_dir)
        (run_dir / "logs").mkdir(exist_ok=True)
        proc = _run(self.cluster, "sbatch", "--parsable", str(run_dir / script_name))
        if proc.returncode != 0:
            raise UserError(f"sbatch refused the job: {_one_line(proc.stderr)}")
        job_id = proc.stdout.strip().split(";")[0]
        return JobRecord(job_id=job_id, backend=self.name, cluster=self.cluster.source, name=job.name,
                         run_dir=job.run_dir, submitted_at=now(), details={"script": str(run_dir / script_name)})

    def status(self, record: JobRecord) -> JobStatus:
        """sacct where accounting is on, squeue --json while the controller holds the job,
        and the job's own files (exit_code, the log) once the controller has forgotten it."""
        return (_sacct(self.cluster, record.job_id) or _squeue(self.cluster, record.job_id)
                or self._from_files(record))

    def _from_files(self, record: JobRecord) -> JobStatus:
        log = Path(self.log_path(record))
        text = log.read_text(errors="replace") if log.exists() else ""
        if "DUE TO TIME LIMIT" in text:
            return JobStatus("TIMEOUT", reason="time limit")
        if re.search(r"\*\*\* JOB \d+ ON \S+ CANCELLED AT", text):
            return JobStatus("CANCELLED")
        exit_file = Path(record.run_dir) / "exit_code"
        if exit_file.exists() and f"job {record.job_id} ended" in text:
            code = int(exit_file.read_text().strip() or 1)
            return JobStatus("COMPLETED" if code == 0 else "FAILED", exit_code=code)
        if text:
            return JobStatus("FAILED", reason="the job ended without writing its exit code")
        return JobStatus("UNKNOWN", reason="Slurm does not know the job and it left no log")

    def log_path(self, record: JobRecord) -> str:
        return str(Path(record.run_dir) / "logs" / f"slurm-{record.job_id}.out")

    def cancel(self, record: JobRecord) -> None:
        proc = _run(self.cluster, "scancel", record.job_id)
        if proc.returncode != 0:
            raise UserError(f"scancel {record.job_id}: {_one_line(proc.stderr)}")



def _client_env(cluster) -> dict:
    env = dict(os.environ)
    if cluster.slurm.conf:
        env["SLURM_CONF"] = os.path.expanduser(cluster.slurm.conf)
    return env


def _run(cluster, *command: str, timeout: float = 60) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=_client_env(cluster))
    except FileNotFoundError:
        raise UserError(f"{command[0]}: not found; install the Slurm client commands "
                        f"(cluster '{cluster.name}' is a Slurm cluster)") from None
    except subprocess.TimeoutExpired:
        raise UserError(f"{command[0]}: Slurm did not answer within {timeout:.0f} s") from None


def _one_line(text: str) -> str:
    return " ".join(text.strip().split())[:500]


def _exit_code(text: str | None) -> tuple[int | None, int | None]:
    """sacct's 'code:signal'."""
    if not text or ":" not in text:
        return None, None
    code, sig = text.split(":", 1)
    return int(code), int(sig)


def _raw_status(value) -> int | None:
    """squeue --json (22.05) gives the raw wait status: exit code in the high byte."""
    if isinstance(value, dict):  # newer data parsers: {"return_code": {"number": N}, ...}
        number = value.get("return_code", {})
        return number.get("number") if isinstance(number, dict) else number
    if value is None:
        return None
    return int(value) >> 8 if int(value) > 255 else int(value)


STATE_ALIASES = {"CANCELLED+": "CANCELLED", "NODE_FAIL": "NODE_FAIL", "OUT_OF_ME+": "OUT_OF_MEMORY"}


def _sacct(cluster, job_id: str) -> JobStatus | None:
    proc = _run(cluster, "sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State,ExitCode,NodeList,Start,End,Reason")
    if proc.returncode != 0 or not proc.stdout.strip():
        return None  # accounting disabled, or not recorded yet
    state, exit_code, nodes, start, end, reason = (proc.stdout.strip().splitlines()[0].split("|") + [""] * 6)[:6]
    state = state.split()[0]
    state = STATE_ALIASES.get(state, state.rstrip("+"))
    code, _ = _exit_code(exit_code)
    return JobStatus(state, exit_code=code if state not in ("PENDING", "RUNNING") else None,
                     nodes=nodes or None, start=start if start not in ("", "Unknown", "None") else None,
                     end=end if end not in ("", "Unknown", "None") else None,
                     reason=reason if reason not in ("", "None") else None)


def _squeue(cluster, job_id: str) -> JobStatus | None:
    proc = _run(cluster, "squeue", "--json")
    if proc.returncode != 0:
        raise UserError(f"squeue: {_one_line(proc.stderr) or 'failed'}")
    data = json.loads(proc.stdout)
    errors = data.get("errors") or []
    if errors:  # 22.05 exits 0 with the failure inside the JSON
        first = errors[0]
        raise UserError(f"squeue: Slurm did not answer ({first.get('source', '')}: "
                        f"{first.get('description') or first.get('error')}); is the controller running?")
    for job in data.get("jobs", []):  # 22.05 ignores -j with --json
        if str(job.get("job_id")) != job_id:
            continue
        state = job.get("job_state")
        if isinstance(state, list):
            state = state[0] if state else "UNKNOWN"
        finished = state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED")
        reason = job.get("state_reason")
        return JobStatus(state, exit_code=_raw_status(job.get("exit_code")) if finished else None,
                         nodes=job.get("nodes") or None, start=_epoch(job.get("start_time")),
                         end=_epoch(job.get("end_time")) if finished else None,
                         reason=reason if reason not in (None, "None") else None)
    return None


def _epoch(value) -> str | None:
    from datetime import datetime

    if isinstance(value, dict):
        value = value.get("number")
    if not value:
        return None
    return datetime.fromtimestamp(int(value)).isoformat(timespec="seconds")
