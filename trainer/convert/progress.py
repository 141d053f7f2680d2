"""A progress line with bytes, rate and ETA on stderr (a bar on a terminal, a line every 10%
in a log file)."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total_bytes: int, label: str, enabled: bool = True):
        self.total, self.label, self.enabled = max(total_bytes, 1), label, enabled
        self.done, self.start, self.last_tenth = 0, time.time(), -1
        self.tty = sys.stderr.isatty()

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
        if not self.enabled:
            return
        tenth = int(10 * self.done / self.total)
        if self.tty or tenth != self.last_tenth:
            self.last_tenth = tenth
            self._show(end="\r" if self.tty else "\n")

    def _show(self, end: str) -> None:
        elapsed = max(time.time() - self.start, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate else 0.0
        width = 30
        filled = int(width * self.done / self.total)
        print(f"{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.done / 1e9:.2f}/{self.total / 1e9:.2f} GB "
              f"{rate / 1e6:.0f} MB/s ETA {eta:.0f}s", end=end, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled and self.tty:
            self._show(end="\n")
