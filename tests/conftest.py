import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "recipes"


def run_launcher(*args, cwd=REPO, env=None, timeout=60):
    """`launcher ARGS` in a fresh interpreter, as a user runs it: (exit code, stdout, stderr)."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "launcher", *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture
def launcher():
    return run_launcher


@pytest.fixture(scope="session")
def init_checkpoint(tmp_path_factory):
    """The tiny model's initial weights as a trainer checkpoint (one step at lr=0), for runs that
    start from one shared checkpoint (test_trainer's layout runs, test_lora's base)."""
    from tests.trainer_helpers import train

    run = tmp_path_factory.mktemp("init")
    train(run, "trainer.total_training_steps=1", "optim.lr=0", "optim.min_lr=0", "optim.lr_warmup_steps_ratio=0",
          "megatron.expert_model_parallel_size=1", "data.val_files=[]")
    return run / "checkpoints" / "step_000001"
