"""megatron-core distributed checkpoints (torch_dist) written and read one tensor at a time.

Writing goes through torch.distributed.checkpoint (DCP) with a planner that produces each
tensor only when the writer asks for it, so memory holds one tensor, not the model. Every
tensor is stored whole under its megatron-core key; megatron-core's loader then reads the
slice each rank needs under any TP/PP/EP layout. Under torchrun every rank writes its share
of the tensors and rank 0 the metadata.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import create_default_global_save_plan
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties, TensorStorageMetadata
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, TensorWriteData, WriteItem, WriteItemType


@dataclass(frozen=True)
class TensorSpec:
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype


class _LazySavePlanner(SavePlanner):
    """Plans the given tensors (this rank's share) and produces each one when it is written."""

    def __init__(self, specs: list[TensorSpec], produce: Callable[[str], torch.Tensor]):
        self.specs, self.produce = specs, produce
        self.previous = None

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator=False) -> None:
        self.is_coordinator = is_coordinator

    def create_local_plan(self) -> SavePlan:
        items = []
        for spec in self.specs:
            size = torch.Size(spec.shape)
            chunk = ChunkStorageMetadata(offsets=torch.Size([0] * len(size)), sizes=size)
            items.append(WriteItem(index=MetadataIndex(spec.key, chunk.offsets), type=WriteItemType.SHARD,
                                   tensor_data=TensorWriteData(chunk=chunk, properties=TensorProperties(dtype=spec.dtype),
                                                               size=size)))
        return SavePlan(items)

    def create_global_plan(self, all_plans):
        return create_default_global_save_plan(all_plans, rewrite_index_hints=False)

    def finish_plan(self, new_plan: SavePlan) -> SavePlan:
        return new_plan

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor:
        # torch's FileSystemWriter keeps a reference to every tensor of a file until the file
        # is closed (for its safetensors format), which would hold the whole model. It asks for
        # tensors one at a time, each after the previous one is written: free that one's memory.
        if self.previous is not None:
            self.previous.untyped_storage().resize_(0)
        tensor = self.produce(write_item.index.fqn).contiguous()
        storage = tensor.untyped_storage()
        if not storage.resizable() or storage.nbytes() != tensor.nbytes:
            tensor = tensor.clone()  # a tensor of our own, exactly its size (the writer would copy it otherwise)
        self.previous = tensor
        return tensor


def release_large_frees() -> None:
    """Serve every allocation of 1 MiB or more by mmap, so that a freed tensor goes back to the
    system at once. glibc otherwise raises that threshold after the first large free and keeps
    later freed tensors in its heap, where peak memory then grows with the model."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD (fixed from now on)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def save(path: Path, specs: list[TensorSpec], produce: Callable[[str], torch.Tensor]) -> None:
    """Write `specs` (this rank's share) into the checkpoint at `path`; collective under torchrun."""
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config

    release_large_frees()
    distributed = dist.is_initialized()
    # One thread and no copy-ahead: the writer then asks for one tensor at a time (see resolve_data).
    writer = dcp.FileSystemWriter(str(path), thread_count=1, sync_files=False, per_thread_copy_ahead=0)
    dcp.save({}, storage_writer=writer, planner=_LazySavePlanner(specs, produce), no_dist=not distributed)
    if not distributed or dist.get_rank() == 0:
        torch.save({}, path / "common.pt")  # megatron-core's non-sharded part: the weights have none
        save_config(CheckpointingConfig(sharded_backend="torch_dist"), str(path))


def tensor_specs(path: Path) -> dict[str, TensorSpec]:
    """Every tensor in a torch_dist checkpoint: key, full shape, stored dtype."""
    if not (path / ".metadata").exists():
        found = json.loads((path / "metadata.json").read_text()) if (path / "metadata.json").exists() else None
        raise ValueError(f"{path}: not a torch_dist checkpoint (metadata.json: {found}); "
                         "point --mcore-path at a step_N directory of the trainer's checkpoints")
    metadata = dcp.FileSystemReader(str(path)).read_metadata()
    return {key: TensorSpec(key, tuple(meta.size), meta.properties.dtype)
            for key, meta in metadata.state_dict_metadata.items() if isinstance(meta, TensorStorageMetadata)}


def read(path: Path, specs: list[TensorSpec]) -> dict[str, torch.Tensor]:
    """The given tensors, whole, however the checkpoint was sharded (this process only)."""
    state = {s.key: torch.empty(s.shape, dtype=s.dtype) for s in specs}
    dcp.load(state, storage_reader=dcp.FileSystemReader(str(path)), no_dist=True)
    return state
