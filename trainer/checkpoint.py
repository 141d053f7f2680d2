"""Distributed checkpoints with megatron-core dist_checkpointing (torch_dist format).

Layout under the checkpoint folder (trainer.default_local_dir):
    step_000030/          model and optimizer shards, trainer_state.json, rng/
    latest                the name of the newest complete checkpoint, written last
A checkpoint is written into step_N.tmp and renamed when every rank has finished, so a
job killed mid-save leaves the previous checkpoint as `latest`. Loading works under any
TP/PP/EP layout: dist_checkpointing reshards.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist


# Optimizer state in the canonical per-parameter form, so a checkpoint loads under any layout.
OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "fully_reshardable"}


def latest(root: Path) -> Path | None:
    pointer = root / "latest"
    if not pointer.exists():
        return None
    path = root / pointer.read_text().strip()
    return path if path.is_dir() else None


def _model_state(model_chunks) -> dict:
    if len(model_chunks) == 1:
        return {"model": model_chunks[0].sharded_state_dict()}
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(model_chunks)}


def save(root: Path, step: int, model_chunks, optimizer, scheduler, trainer_state: dict) -> Path:
    from megatron.core import dist_checkpointing
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    name = f"step_{step:06d}"
    final, tmp = root / name, root / f"{name}.tmp"
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    state = _model_state(model_chunks)
    state["optimizer"] = optimizer.sharded_state_dict(state, metadata=OPTIMIZER_FORMAT)
    dist_checkpointing.save(state, str(tmp))
    (tmp / "rng").mkdir(exist_ok=True)
    torch.save({"cpu": torch.get_rng_state(), "cuda_tracker": get_cuda_rng_tracker().get_states()},
               tmp / "rng" / f"rank{rank:05d}.pt")
    if rank == 0:
        (tmp / "trainer_state.json").write_text(json.dumps({**trainer_state, "scheduler": scheduler.state_dict()}))
    dist.barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer = root / "latest.tmp"
        pointer.write_text(name + "\n")
        os.replace(pointer, root / "latest")  # last: only now is the checkpoint complete
    dist.barrier()
    return final


def load(path: Path, model_chunks, optimizer=None, scheduler=None) -> dict:
    """Load weights (and, given them, optimizer and scheduler); returns the trainer state."""
    from megatron.core import dist_checkpointing
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state = _model_state(model_chunks)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=True, metadata=OPTIMIZER_FORMAT)
    loaded = dist_checkpointing.load(state, str(path))
    for i, chunk in enumerate(model_chunks):
        chunk.load_state_dict(loaded["model" if len(model_chunks) == 1 else f"model{i}"])
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    trainer_state = {}
    state_file = path / "trainer_state.json"
    if state_file.exists():
        trainer_state = json.loads(state_file.read_text())
        if scheduler is not None:
            scheduler.load_state_dict(trainer_state["scheduler"])
    rng_file = path / "rng" / f"rank{dist.get_rank():05d}.pt"
    if optimizer is not None and rng_file.exists():  # same layout: continue the same random streams
        rng = torch.load(rng_file, weights_only=False)
        torch.set_rng_state(rng["cpu"])
        get_cuda_rng_tracker().set_states(rng["cuda_tracker"])
    return trainer_state
