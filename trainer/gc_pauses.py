"""Python's garbage collector: its pauses kept short, and counted per step.

A full collection walks every object the interpreter tracks: about 445,000 once torch,
megatron-core and transformers are imported (0.21 s a collection on a CPU of this workplace),
more with transformer-engine and the model built: 0.43 s in a rank on an H200 host, 0.55 s in a
CPU rank. A rank that pauses in one holds every other rank at the next collective, so with more
ranks some rank pauses in more steps; transformer-engine's Python layers make more garbage a
step, so its full collections come more often (bench/README.md).

Once setup is done, every object alive is frozen (`gc.freeze`: moved where the collector never
looks again): the libraries' modules, the model, the optimizer. A collection then walks only what
training made since. The collector stays on, so garbage in cycles is still freed.
"""

from __future__ import annotations

import gc
import time


class GcPauses:
    """Seconds the collector ran in this process (every generation), since the last `take`."""

    def __init__(self):
        self.seconds, self._began = 0.0, None
        gc.callbacks.append(self._event)

    def _event(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._began = time.perf_counter()
        elif self._began is not None:
            self.seconds += time.perf_counter() - self._began
            self._began = None

    def take(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds

    def close(self) -> None:
        if self._event in gc.callbacks:
            gc.callbacks.remove(self._event)


def freeze_setup() -> None:
    """Collect what setup left as garbage, then freeze the rest (called once, before training)."""
    gc.collect()
    gc.freeze()
