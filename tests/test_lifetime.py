"""A rank's helper processes end with it: a rank SIGKILLed while megatron-core's checkpoint
writers (processes it forks during a save) run must not leave them holding its sockets and
its job's output stream."""

import os
import signal
import subprocess
import sys
import time
from tests.conftest import REPO
from tests.trainer_helpers import alive

# A stand-in for a rank during a save: forks a writer the way megatron-core does
# (multiprocessing's fork context, from the main thread), prints its pid and waits.
RANK = """
import multiprocessing, sys, time
from trainer.lifetime import forks_end_with_this_process
if sys.argv[1] == "hooked":
    forks_end_with_this_process()
writer = multiprocessing.get_context("fork").Process(target=time.sleep, args=(120,))
writer.start()
print(writer.pid, flush=True)
time.sleep(120)
"""


def _writer_after_the_rank_is_killed(mode: str) -> bool:
    rank = subprocess.Popen([sys.executable, "-c", RANK, mode], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    writer = int(rank.stdout.readline())
    try:
        rank.kill()
        rank.wait()
        deadline = time.time() + 5
        while time.time() < deadline and alive([writer]):
            time.sleep(0.1)
        return bool(alive([writer]))
    finally:
        if alive([writer]):
            os.kill(writer, signal.SIGKILL)


def test_a_killed_ranks_forked_writers_end_with_it():
    assert not _writer_after_the_rank_is_killed("hooked")
    assert _writer_after_the_rank_is_killed("plain")  # what megatron-core's fork alone leaves behind
