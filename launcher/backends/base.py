"""The interface every backend implements."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path

from launcher.cluster import Cluster
from launcher.job import Job


class Backend(ABC):
    def __init__(self, cluster: Cluster):
        self.cluster = cluster

    @abstractmethod
    def render(self, job: Job) -> dict[str, str]:
        """The job's files, by file name. Pure: the same job gives the same bytes."""


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
