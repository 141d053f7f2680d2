"""Runs the real trainer under torchrun on the CPU (gloo) for the trainer tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from launcher.recipe import load_recipe
from tests.conftest import REPO, RECIPES

TINY = RECIPES / "tiny_moe.yaml"


def write_recipe(run_dir: Path, *overrides: str, recipe: Path = TINY) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = load_recipe(recipe, [f"trainer.default_local_dir={run_dir / 'checkpoints'}", *overrides])
    path = run_dir / "recipe.yaml"
    path.write_text(resolved.to_yaml())
    return path


def train(run_dir: Path, *overrides: str, nproc: int = 2, recipe: Path = TINY, check: bool = True):
    """Train with the tiny recipe and overrides; returns (exit code, log text, metrics records)."""
    config = write_recipe(run_dir, f"trainer.n_gpus_per_node={nproc}", *overrides, recipe=recipe)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                           "-m", "trainer", "--config", str(config)], cwd=run_dir, env=env,
                          capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    if check and proc.returncode != 0:
        raise AssertionError(f"trainer failed ({proc.returncode}):\n{log[-4000:]}")
    metrics = []
    if (run_dir / "metrics.jsonl").exists():
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return proc.returncode, log, metrics


def job_processes(text: str) -> list[int]:
    """Live processes whose command line holds `text` (a run's recipe or directory): torchrun,
    its ranks, their data workers and tokenisers."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if text in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace") \
                    and (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                found.append(int(proc.name))
        except (OSError, IndexError):
            continue
    return found


def _parents() -> dict[int, int]:
    """Each live (not zombie) process's parent."""
    parents = {}
    for proc in Path("/proc").iterdir():
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if proc.name.isdigit() and fields[0] != "Z":
            parents[int(proc.name)] = int(fields[1])
    return parents


def descendants(root: int) -> list[int]:
    """The live processes under `root`: children, grandchildren and so on."""
    parents, found, frontier = _parents(), [], {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier}
        found.extend(sorted(frontier))
    return found


def alive(pids: list[int]) -> list[int]:
    """Those of `pids` still running, wherever they now hang (re-parented to init or not)."""
    parents = _parents()
    return [pid for pid in pids if pid in parents]


def recipe_processes(config: str) -> dict[int, int]:
    """The live processes torchrun started with this recipe file and whatever they forked
    (re-parented or not; torchrun itself left out), as pid -> parent pid."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if config in cmdline and "trainer" in cmdline and "torch.distributed.run" not in cmdline:
            found[int(proc.name)] = parent
    return found


def training_processes(config: str) -> list[int]:
    """The pids of the trainer processes started with this recipe file: torchrun's children,
    not torchrun, and not their forked data workers (trainer.data.batches.prefetch)."""
    found = recipe_processes(config)
    return sorted(pid for pid, parent in found.items() if parent not in found)


def losses(metrics) -> list[float]:
    return [m["loss"] for m in metrics if "loss" in m]


def plain_tensors(checkpoint_dir: Path) -> dict:
    """Every tensor of a torch_dist checkpoint, unsharded, by name (single process, no model)."""
    script = ("import sys, tempfile, torch\n"
              "torch.distributed.init_process_group('gloo', rank=0, world_size=1,\n"
              "    init_method='file://' + tempfile.mktemp())\n"
              "from megatron.core.dist_checkpointing import load_plain_tensors\n"
              "t = load_plain_tensors(sys.argv[1])\n"
              "torch.save({k: v for k, v in t.items() if hasattr(v, 'shape')}, sys.argv[2])\n")
    out = checkpoint_dir.parent / f"{checkpoint_dir.name}.plain.pt"
    subprocess.run([sys.executable, "-c", script, str(checkpoint_dir), str(out)], check=True,
                   capture_output=True, timeout=300)
    import torch

    return torch.load(out)
