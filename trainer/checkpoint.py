"""Distributed checkpoints with megatron-core dist_checkpointing (torch_dist format).

Layout under the checkpoint folder (trainer.default_local_dir):
    step_000030/          model and optimizer shards, trainer_state.json, rng/
    latest                the name of the newest complete checkpoint, written last
A checkpoint is written into step_N.tmp and renamed when every rank has finished, so a
job killed mid-save leaves the previous checkpoint as `latest`. Loading works under any
TP/PP/EP layout: dist_checkpointing reshards. With `keep` (trainer.max_ckpt_to_keep) the
oldest complete checkpoints go once a newer one is complete. Before a resume, `damage`
checks every file against the checkpoint's own index, so a truncated or missing file is
named instead of failing deep inside the load.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
from pathlib import Path

import torch
import torch.distributed as dist


# Optimizer state in the canonical per-parameter form, under names that do not depend on how
# many optimizers megatron-core chains (one, or one for dense and one for expert weights, by
# layout), so a checkpoint loads under any layout.
OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}


def latest(root: Path) -> Path | None:
    pointer = root / "latest"
    if not pointer.exists():
        return None
    path = root / pointer.read_text().strip()
    return path if path.is_dir() else None


def complete(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (a .tmp folder is an unfinished save)."""
    return sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))


def damage(path: Path) -> str | None:
    """What is wrong with a checkpoint's files, or None: every shard as long as the index
    (torch_dist's .metadata) says, the common state and trainer state readable."""
    import pickle

    try:
        with open(path / ".metadata", "rb") as f:
            index = pickle.load(f)
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ImportError) as err:
        return f"{path / '.metadata'}: unreadable ({err or type(err).__name__})"
    needed: dict[str, int] = {}
    for info in index.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = path / name
        if not file.exists():
            return f"{file}: missing"
        if file.stat().st_size < size:
            return f"{file}: truncated ({file.stat().st_size} of {size} bytes)"
    try:
        torch.load(path / "common.pt", weights_only=False)
        json.loads((path / "trainer_state.json").read_text())
    except Exception as err:  # noqa: BLE001 - any failure to read is damage
        return f"{path}: common.pt or trainer_state.json unreadable ({type(err).__name__}: {err})"
    return None


def resume_point(root: Path, asked: str | None) -> Path | None:
    """The checkpoint to resume from: `latest`, or the one asked for (trainer.resume_from_path)
    unless `latest` is newer and sound. A damaged one is refused (UserError) naming the file
    and the newest sound checkpoint before it."""
    from launcher.errors import UserError

    chosen = latest(root)
    problem = damage(chosen) if chosen is not None else None
    # the one asked for, unless `latest` is newer and sound (a requeued job goes on from there)
    if asked and (chosen is None or chosen.name <= Path(asked).name or problem):
        chosen = Path(asked)
        if not chosen.is_dir():
            raise UserError(f"trainer.resume_from_path: {asked} is not a checkpoint folder")
        problem = damage(chosen)
    if chosen is None:
        return None
    if problem:
        earlier = [p for p in complete(chosen.parent) if p.name < chosen.name and damage(p) is None]
        offer = (f"the newest complete one before it is {earlier[-1]}: resume from it with "
                 f"trainer.resume_from_path={earlier[-1]}" if earlier else "no complete checkpoint before it")
        raise UserError(f"checkpoint {chosen} is damaged: {problem}; {offer}")
    return chosen


def rotate(root: Path, keep: int | None) -> None:
    """Delete all but the newest `keep` complete checkpoints (rank 0, after `latest` moved)."""
    if keep:
        for old in complete(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def _unwrap(chunk):
    return getattr(chunk, "module", chunk)  # megatron-core DDP keeps the model in .module


# One key per layer and per expert (and gate/up halves of GLU weights apart), not stacked
# along layer or expert axes: the same keys whatever the layout, the spec (GroupedMLP or
# SequentialMLP) or the model's mix of dense and MoE layers, and the keys that
# `launcher convert` writes from a Hugging Face checkpoint.
MODEL_FORMAT = {"non_homogeneous_layers": True, "singleton_local_shards": True}


def _model_state(model_chunks, base: bool = False) -> dict:
    """The model's sharded state, without transformer-engine's per-layer extra state (FP8
    scaling history, unused here), so TE and TE-free runs read each other's checkpoints.
    A LoRA run's state is its adapters (trainer.model.lora); `base` asks for the frozen base
    weights instead, which come from the base checkpoint."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from trainer.model import lora

    if not base and lora.adapters(model_chunks):
        return {"adapters": lora.adapter_state(model_chunks)}

    def weights(chunk):
        state = _unwrap(chunk).sharded_state_dict(metadata=MODEL_FORMAT)
        return {k: v for k, v in state.items()
                if not (isinstance(v, ShardedObject) and "_extra_state" in k) and lora.ADAPTER_KEY not in k}

    if len(model_chunks) == 1:
        return {"model": weights(model_chunks[0])}
    return {f"model{i}": weights(chunk) for i, chunk in enumerate(model_chunks)}


def _load_model(loaded: dict, model_chunks, path: Path) -> None:
    """Weights into the chunks; a checkpoint's common state (the optimizer's, when it has one)
    comes back from dist_checkpointing beside them, under its own keys."""
    from trainer.model import lora

    if "adapters" in loaded:
        lora.load_adapters(loaded["adapters"], model_chunks)
        return
    names = ["model"] if len(model_chunks) == 1 else [f"model{i}" for i in range(len(model_chunks))]
    for name, chunk in zip(names, model_chunks):
        missing, unexpected = _unwrap(chunk).load_state_dict(loaded[name], strict=False)
        missing = [k for k in missing if "_extra_state" not in k and lora.ADAPTER_KEY not in k]
        if missing or unexpected:
            raise ValueError(f"{path}: weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")


def _writer_results_in_this_process() -> None:
    """megatron-core's checkpoint writer hands its results over through a queue of a
    multiprocessing Manager, a process it spawns at the first save: a fresh interpreter (about
    2 s of every run's first save) that inherited this process's output streams and outlived it
    when it was killed (Slurm then waited a minute for the streams of a dead rank to close). The
    trainer saves synchronously: the writer puts its results and megatron-core takes them in this
    process, so a queue of this process carries them, and no process is started."""
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async
    except ImportError:
        return
    if getattr(filesystem_async, "_results_queue", True) is None:  # not made yet (megatron-core 0.16)
        filesystem_async._results_queue = queue.Queue()


def save(root: Path, step: int, model_chunks, optimizer, scheduler, trainer_state: dict,
         keep: int | None = None) -> Path:
    from megatron.core import dist_checkpointing
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    _writer_results_in_this_process()
    name = f"step_{step:06d}"
    final, tmp = root / name, root / f"{name}.tmp"
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    state = _model_state(model_chunks)
    state["optimizer"] = optimizer.sharded_state_dict(state, metadata=OPTIMIZER_FORMAT)
    problem = None
    try:
        dist_checkpointing.save(state, str(tmp))
        (tmp / "rng").mkdir(exist_ok=True)
        torch.save({"cpu": torch.get_rng_state(), "cuda_tracker": get_cuda_rng_tracker().get_states()},
                   tmp / "rng" / f"rank{rank:05d}.pt")
        if rank == 0:
            (tmp / "trainer_state.json").write_text(json.dumps({**trainer_state, "scheduler": scheduler.state_dict()}))
    except BaseException as err:  # torch's CheckpointException is a BaseException
        if isinstance(err, (KeyboardInterrupt, SystemExit)):
            raise
        problem = _first_cause(err)  # a full disk, a file too large, a lost mount
    _all_ranks_agree_or_stop(problem, root, final, tmp)
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer = root / "latest.tmp"
        pointer.write_text(name + "\n")
        os.replace(pointer, root / "latest")  # last: only now is the checkpoint complete
        rotate(root, keep)
    dist.barrier()
    return final


def _first_cause(err: BaseException) -> str:
    """The failure under a failed save, in one line: the OS error where there is one, else the
    last line of what torch's checkpoint writer reports (it wraps its workers' errors)."""
    chain, cause = [], err
    while cause is not None and cause not in chain:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    for cause in chain:
        if isinstance(cause, OSError):
            return str(cause)
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


def _all_ranks_agree_or_stop(problem: str | None, root: Path, final: Path, tmp: Path) -> None:
    """Every rank stops when any could not write its part: the half-written folder goes and
    `latest` keeps naming the previous checkpoint."""
    from launcher.errors import UserError
    from trainer import devices

    failed = torch.tensor([1.0 if problem else 0.0], device=devices.device())
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if not failed.item():
        return
    usage = shutil.disk_usage(root)  # before the half-written folder goes: what the writer saw
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    previous = latest(root)
    size = lambda n: f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"  # noqa: E731
    space = (f"the file system is full: {size(usage.free)} free of {size(usage.total)}"
             if usage.free < max(64 * 2**20, usage.total // 100) else f"{size(usage.free)} free there")
    raise UserError(f"could not write checkpoint {final}: {problem or 'another rank could not write its part'} "
                    f"({space}); `latest` still names {previous if previous else 'no checkpoint'}")


def _materialise_adam_state(optimizer) -> None:
    """Give a fresh torch Adam its state tensors and step before loading into it.

    megatron-core 0.16 without apex or transformer-engine reads the step count out of the
    torch optimizer's state, which is empty until the first step. transformer-engine's
    FusedAdam keeps its step elsewhere and has megatron-core fill its state on load.
    """
    for chained in getattr(optimizer, "chained_optimizers", [optimizer]):
        adam = getattr(chained, "optimizer", None)
        if not isinstance(adam, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        for group in adam.param_groups:
            for param in group["params"]:
                state = adam.state[param]
                if not state:
                    state["exp_avg"] = torch.zeros_like(param.data)
                    state["exp_avg_sq"] = torch.zeros_like(param.data)
                state.setdefault("step", torch.zeros((), dtype=torch.float32))


def _keep_step_when_copying_states() -> None:
    """megatron-core 0.16 with torch's Adam (no apex, no transformer-engine) sets a step in
    every parameter's state from the param groups, then copies each state entry from the
    checkpoint's tensors, which leave the step out: a KeyError. Keep the step it just set."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states
    if getattr(original, "keeps_step", False):
        return

    def set_states(self, model_param, tensors):
        if "step" not in tensors and not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            state = self.optimizer.state[self.optimizer.param_groups[group_index]["params"][group_order]]
            if "step" in state:
                tensors = {**tensors, "step": state["step"].clone()}
        return original(self, model_param, tensors)

    set_states.keeps_step = True
    DistributedOptimizer._set_main_param_and_optimizer_states = set_states


def _unshare_steps(optimizer) -> None:
    """megatron-core gives every parameter the same step tensor on load; torch's Adam adds 1 to
    it in place once per parameter, which would advance the bias correction many steps at a time."""
    for chained in getattr(optimizer, "chained_optimizers", [optimizer]):
        adam = getattr(chained, "optimizer", None)
        for state in (adam.state.values() if adam is not None else []):
            if "step" in state:
                state["step"] = state["step"].clone()


def _optimizer_parts(state) -> list[dict]:
    """The state dicts of each chained optimizer (a dict keyed 0, 1, ... when there are several)."""
    if state is None:
        return []
    if "param_state" not in state and all(isinstance(k, int) for k in state):
        return [state[k] for k in sorted(state)]
    return [state]


def load_weights(path: Path, model_chunks) -> None:
    """Initial weights: a checkpoint written by `launcher convert`, or the model part of any
    trainer checkpoint."""
    from megatron.core import dist_checkpointing

    state = _model_state(model_chunks, base=True)
    _load_model(dist_checkpointing.load(state, str(path)), model_chunks, path)


def load_adapters(path: Path, model_chunks) -> None:
    """A LoRA run's adapters, without its optimizer (the base weights come from load_weights)."""
    from megatron.core import dist_checkpointing

    _load_model(dist_checkpointing.load(_model_state(model_chunks), str(path)), model_chunks, path)


def load(path: Path, model_chunks, optimizer, scheduler) -> dict:
    """Resume: weights, optimizer, scheduler and RNG; returns the trainer state."""
    from megatron.core import dist_checkpointing
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state = _model_state(model_chunks)
    _materialise_adam_state(optimizer)
    state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=True, metadata=OPTIMIZER_FORMAT)
    requested = [{k: v for k, v in part.items() if not isinstance(k, int)}
                 for part in _optimizer_parts(state["optimizer"])]
    loaded = dist_checkpointing.load(state, str(path))
    _load_model(loaded, model_chunks, path)
    trainer_state = json.loads((path / "trainer_state.json").read_text())
    scheduler.load_state_dict(trainer_state["scheduler"])
    # Per-parameter states reshard; the small non-tensor part (param groups, step) is kept
    # per chained optimizer, whose count changes with the layout (dense and expert
    # optimizers are merged when EP=1). Where the checkpoint's does not fit, take this
    # optimizer's own groups with the step count of the checkpoint.
    for mine, theirs in zip(requested, _optimizer_parts(loaded["optimizer"])):
        for key in [k for k in theirs if isinstance(k, int)]:
            del theirs[key]  # another layout's per-optimizer entries
        for key, value in mine.items():
            theirs.setdefault(key, value)
        own_groups = mine.get("optimizer", {}).get("param_groups", [])
        for group, own in zip(theirs["optimizer"]["param_groups"], own_groups):
            # another optimizer's groups (torch's Adam, transformer-engine's FusedAdam) lack
            # this one's settings, such as FusedAdam's bias_correction: keep its own
            for key, value in own.items():
                group.setdefault(key, value)
        for group in theirs["optimizer"]["param_groups"]:
            group["step"] = trainer_state["step"]  # one optimizer step per trainer step
    _keep_step_when_copying_states()
    optimizer.load_state_dict(loaded["optimizer"])
    _unshare_steps(optimizer)
    rng_file = path / "rng" / f"rank{dist.get_rank():05d}.pt"
    if rng_file.exists():  # same layout: continue the same random streams
        rng = torch.load(rng_file, weights_only=False)
        torch.set_rng_state(rng["cpu"])
        get_cuda_rng_tracker().set_states(rng["cuda_tracker"])
    return trainer_state
