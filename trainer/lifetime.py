"""A job's processes end with the process that started them.

torchrun starts each rank in a session of its own, and a rank starts helpers (the data worker
and its tokenisers). When the parent is SIGKILLed - a time-out's kill, the kernel's
out-of-memory killer, a dead rank - nothing stops its children: seen here, two CPU ranks trained
on for minutes re-parented to init after torchrun was killed, and every killed rank left a helper
process of 273 MB running (megatron-core's checkpoint-writer Manager, which the trainer no longer
starts: trainer.checkpoint); on a GPU node a rank would keep its memory.
Linux's parent-death signal ends the child even while it waits inside a collective.
"""

from __future__ import annotations

import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def end_with_parent(parent: int | None = None) -> None:
    """SIGKILL this process when its parent ends (Linux; elsewhere nothing). Meant for the start
    of a process, in its main thread: the signal fires when the thread that forked it ends.
    `parent`: the pid the parent had, where the caller knows it (a forked child)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1 or (parent is not None and os.getppid() != parent):
        os.kill(os.getpid(), signal.SIGKILL)  # the parent ended before the signal was armed


_forked_by: int | None = None  # the pid forking right now, when it forks from its main thread
_hooked = False


def forks_end_with_this_process() -> None:
    """From now on, every process this one forks from its main thread ends when this one does,
    and so on down (the hook is inherited). megatron-core's checkpoint save forks two writer
    processes a save; a rank killed during one left them running with its sockets and output
    stream open, so its peer saw no closed connection and Slurm waited on the stream. A fork
    from another thread is left alone: the parent-death signal follows the forking thread."""
    global _hooked
    if _hooked or not sys.platform.startswith("linux"):
        return
    _hooked = True
    os.register_at_fork(before=_note_forker, after_in_child=_end_with_forker)


def _note_forker() -> None:
    import threading

    global _forked_by
    _forked_by = os.getpid() if threading.current_thread() is threading.main_thread() else None


def _end_with_forker() -> None:
    if _forked_by is not None:
        end_with_parent(_forked_by)
