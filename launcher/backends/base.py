"""The interface every backend implements."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path

import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

from launcher.cluster import Cluster
from launcher.job import Job
from launcher.store import JobRecord

# Slurm's names; every backend maps its own states onto these.
FINISHED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "PREEMPTED", "NODE_FAIL", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE")


@dataclass
class JobStatus:
    state: str  # PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, TIMEOUT, PREEMPTED, ... UNKNOWN
    exit_code: Optional[int] = None
    nodes: Optional[str] = None
    start: Optional[str] = None
    end: Optional[str] = None
    reason: Optional[str] = None
    extra: dict = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.state in FINISHED


class Backend(ABC):
    """render -> submit -> status / logs / cancel, the same for every place jobs run."""

    name = "backend"

    def __init__(self, cluster: Cluster):
        self.cluster = cluster

    @abstractmethod
    def render(self, job: Job) -> dict[str, str]:
        """The job's files, by file name. Pure: the same job gives the same bytes."""

    @abstractmethod
    def submit(self, job: Job, files: dict[str, str]) -> JobRecord:
        """Start the job; raise UserError (and record nothing) when it cannot be submitted."""

    @abstractmethod
    def status(self, record: JobRecord) -> JobStatus: ...

    @abstractmethod
    def log_path(self, record: JobRecord) -> Optional[str]:
        """The file that holds the job's output, where the backend writes one."""

    @abstractmethod
    def cancel(self, record: JobRecord) -> None: ...

    def logs(self, record: JobRecord, follow: bool = False, poll_s: float = 1.0) -> Iterator[str]:
        """The job's output; with follow, new output as it comes until the job ends."""
        path = self.log_path(record)
        position = 0
        while True:
            if path and os.path.exists(path):
                with open(path, errors="replace") as f:
                    f.seek(position)
                    chunk = f.read()
                    position = f.tell()
                if chunk:
                    yield chunk
            if not follow:
                return
            if self.status(record).finished:
                if path and os.path.exists(path):
                    with open(path, errors="replace") as f:
                        f.seek(position)
                        rest = f.read()
                    if rest:
                        yield rest
                return
            time.sleep(poll_s)


def write_files(files: dict[str, str], directory: Path) -> list[Path]:
    """Write every file, each through a temporary name, so none is left half-written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in files.items():
        target = directory / name
        tmp = target.with_name(f".{name}.tmp{os.getpid()}")
        tmp.write_text(text)
        if name.endswith((".sh", ".sbatch")):
            tmp.chmod(0o755)
        os.replace(tmp, target)
        written.append(target)
    return written
