"""This machine: a shell script that runs torchrun --standalone, detached from the launcher.

The script writes RUN_DIR/exit_code when torchrun ends; the job is RUNNING while its
process group lives, CANCELLED once `launcher cancel` has stopped it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from datetime import datetime
from pathlib import Path
from typing import Optional

from launcher.backends.base import Backend, JobStatus, write_files
from launcher.errors import UserError
from launcher.job import HEREDOC, Job, layout_text
from launcher.render import render_template
from launcher.store import JobRecord, now

LOG = "logs/job.log"


class LocalBackend(Backend):
    name = "local"

    def render(self, job: Job) -> dict[str, str]:
        if HEREDOC in job.recipe_yaml:
            raise UserError(f"{job.recipe_source}: the recipe may not contain the line {HEREDOC}")
        script = render_template("local.sh.j2", job=job, heredoc=HEREDOC, layout_text=layout_text(job))
        return {f"{job.name}.sh": script, "recipe.yaml": job.recipe_yaml}

    def submit(self, job: Job, files: dict[str, str]) -> JobRecord:
        run_dir = Path(job.run_dir)
        exit_file = run_dir / "exit_code"
        exit_file.unlink(missing_ok=True)
        (run_dir / "CANCELLED").unlink(missing_ok=True)
        write_files(files, run_dir)
        (run_dir / "logs").mkdir(exist_ok=True)
        with open(run_dir / LOG, "ab") as log:
            log.write(f"=== moe-launcher local job started {datetime.now():%Y-%m-%d %H:%M:%S} ===\n".encode())
            log.flush()
            proc = subprocess.Popen(["bash", str(run_dir / f"{job.name}.sh")], cwd=run_dir, stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        return JobRecord(job_id=f"local-{proc.pid}", backend=self.name, cluster=self.cluster.source,
                         name=job.name, run_dir=job.run_dir, submitted_at=now(),
                         details={"pid": proc.pid, "started": _process_start(proc.pid)})

    def status(self, record: JobRecord) -> JobStatus:
        run_dir = Path(record.run_dir)
        pid = record.details["pid"]
        started = datetime.fromtimestamp(record.submitted_at).isoformat(timespec="seconds")
        alive = _process_start(pid) == record.details.get("started") and _process_start(pid) is not None
        if (run_dir / "CANCELLED").exists() and not alive:
            return JobStatus("CANCELLED", exit_code=None, nodes="localhost", start=started,
                             end=_mtime(run_dir / "CANCELLED"))
        if alive:
            return JobStatus("RUNNING", nodes="localhost", start=started)
        exit_file = run_dir / "exit_code"
        if exit_file.exists():
            code = int(exit_file.read_text().strip() or 1)
            return JobStatus("COMPLETED" if code == 0 else "FAILED", exit_code=code, nodes="localhost",
                             start=started, end=_mtime(exit_file))
        return JobStatus("FAILED", exit_code=None, nodes="localhost", start=started,
                         reason="the job's processes ended without writing an exit code")

    def log_path(self, record: JobRecord) -> Optional[str]:
        return str(Path(record.run_dir) / LOG)

    def cancel(self, record: JobRecord) -> None:
        pid = record.details["pid"]
        if _process_start(pid) != record.details.get("started"):
            return  # already ended
        Path(record.run_dir, "CANCELLED").touch()
        try:
            os.killpg(pid, signal.SIGTERM)
            for _ in range(100):
                if _process_start(pid) is None:
                    return
                time.sleep(0.1)
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _process_start(pid: int) -> Optional[str]:
    """The process's start time (from /proc), so a reused pid is not taken for the job."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        if fields[0] == "Z":
            return None
        return fields[19]
    except (FileNotFoundError, IndexError):
        return None


def _mtime(path: Path) -> str:
    return datetime.fromtimestamp(path.stat().st_mtime).isoformat(timespec="seconds")
