"""The job store: one SQLite file that remembers what was submitted, so that status, logs and
cancel work from any shell. WAL mode and a busy timeout let launcher processes share it."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from launcher.errors import UserError


@dataclass
class JobRecord:
    job_id: str  # the backend's id: a Slurm job id, local-<pid>, k8s/<namespace>/<name>
    backend: str
    cluster: str  # the cluster profile path, so the backend can be rebuilt later
    name: str
    run_dir: str
    submitted_at: float
    details: dict  # backend specifics (pid, namespace, ...)


def store_path() -> Path:
    home = Path(os.environ.get("MOE_LAUNCHER_HOME", Path.home() / ".moe-launcher"))
    return home / "jobs.sqlite"


class JobStore:
    def __init__(self, path: Path | None = None):
        self.path = path or store_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("""CREATE TABLE IF NOT EXISTS jobs (
            job_id TEXT PRIMARY KEY, backend TEXT, cluster TEXT, name TEXT, run_dir TEXT,
            submitted_at REAL, details TEXT)""")

    def add(self, record: JobRecord) -> None:
        self.db.execute("INSERT OR REPLACE INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (record.job_id, record.backend, record.cluster, record.name, record.run_dir,
                         record.submitted_at, json.dumps(record.details)))

    def get(self, job_id: str) -> JobRecord:
        row = self.db.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        if row is None:
            raise UserError(f"job {job_id}: not in the job store {self.path}; `launcher list` shows the known jobs")
        return _record(row)

    def recent(self, limit: int = 20) -> list[JobRecord]:
        rows = self.db.execute("SELECT * FROM jobs ORDER BY submitted_at DESC LIMIT ?", (limit,)).fetchall()
        return [_record(r) for r in rows]


def _record(row) -> JobRecord:
    return JobRecord(job_id=row[0], backend=row[1], cluster=row[2], name=row[3], run_dir=row[4],
                     submitted_at=row[5], details=json.loads(row[6]))


def now() -> float:
    return time.time()
