"""Grouped-GEMM experts without transformer-engine or the grouped_gemm package.

megatron-core's GroupedMLP keeps all local experts' weights in two tensors and runs them as
grouped matrix products through `grouped_gemm.ops.gmm`. `torch._grouped_mm` (PyTorch 2.8+,
bf16 on Hopper) does the same in one kernel, with autograd; this module gives GroupedMLP that
function under the name it calls. Without it (other GPUs, other dtypes) the product runs
expert by expert, which is still one Python loop instead of SequentialMLP's module per expert.
"""

from __future__ import annotations

import types

import torch


def gmm(a: torch.Tensor, b: torch.Tensor, batch_sizes: torch.Tensor, trans_b: bool = False) -> torch.Tensor:
    """Rows of `a`, grouped by `batch_sizes` (tokens per expert), times each group's matrix in `b`."""
    if trans_b:
        b = b.transpose(1, 2)
    if a.is_cuda and a.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm") \
            and torch.cuda.get_device_capability(a.device)[0] >= 9:
        return torch._grouped_mm(a, b, offs=torch.cumsum(sizes_on_device(batch_sizes, a.device), 0, dtype=torch.int32))
    outputs, start = [], 0
    for expert, rows in enumerate(batch_sizes.tolist()):
        outputs.append(a[start:start + rows] @ b[expert])
        start += rows
    return torch.cat(outputs) if outputs else a.new_zeros(0, b.shape[-1])


def sizes_on_device(batch_sizes: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Tokens per expert on the GPU without the host waiting. Under EP or expert TP the
    dispatcher has read them to the host (for the all-to-all's splits); a copy from ordinary
    host memory would make the host wait for the GPU to drain (twice a layer: fc1 and fc2),
    and the GPU would then idle while the host launched what follows. Through pinned memory
    the copy is queued like a kernel (trainer.data.batches.to_device)."""
    if batch_sizes.is_cuda:
        return batch_sizes
    from trainer.data.batches import to_device

    return to_device(batch_sizes.numpy(), device)


def install() -> None:
    """Make megatron-core's GroupedMLP use `gmm` when the grouped_gemm package is absent, and
    name its checkpoint tensors right on every pipeline stage."""
    from megatron.core.transformer.moe import experts, grouped_gemm_util

    _keep_expert_keys_under_pipeline(experts.GroupedMLP)
    if grouped_gemm_util.grouped_gemm_is_available():
        return
    shim = types.SimpleNamespace(ops=types.SimpleNamespace(gmm=gmm), assert_grouped_gemm_is_available=lambda: None,
                                 grouped_gemm_is_available=lambda: True)
    experts.gg = shim


def _keep_expert_keys_under_pipeline(grouped_mlp) -> None:
    """megatron-core 0.16's GroupedMLP names each expert's checkpoint tensor (one key per
    expert, the trainer's format) by replacing its module prefix inside the tensor's key. By
    the time the key is built, the transformer block has renamed the layer from its number on
    this pipeline stage to its global number; on every stage but the first the two differ, the
    replacement finds nothing, all experts get one key and saving fails. Build under the local
    key, then rename the tensors to the global one."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    original = grouped_mlp.sharded_state_dict
    if getattr(original, "keeps_expert_keys", False):
        return

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        state = original(self, prefix, sharded_offsets, metadata)
        for value in state.values():
            if isinstance(value, ShardedTensorFactory):
                value.build_fn = _built_under_local_key(value.build_fn, prefix)
        return state

    sharded_state_dict.keeps_expert_keys = True
    grouped_mlp.sharded_state_dict = sharded_state_dict


def _built_under_local_key(build_fn, local_prefix: str):
    import re

    # "decoder.layers.<local>.mlp.experts." and its global twin, anywhere in the key (the
    # optimizer's keys carry their own prefix in front)
    twin = re.compile(re.sub(r"\\\.\d+\\\.", r"\\.\\d+\\.", re.escape(local_prefix)))

    def build(key, tensor, replica_id, flattened_range, *args, **kwargs):
        found = twin.search(key)
        if found is None or found.group(0) == local_prefix:
            return build_fn(key, tensor, replica_id, flattened_range, *args, **kwargs)
        built = build_fn(key.replace(found.group(0), local_prefix, 1), tensor, replica_id, flattened_range,
                         *args, **kwargs)
        _rename(built, local_prefix, found.group(0))
        return built

    return build


def _rename(built, old: str, new: str) -> None:
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    if isinstance(built, ShardedTensor):
        built.key = built.key.replace(old, new, 1)
    elif isinstance(built, dict):
        for value in built.values():
            _rename(value, old, new)
    elif isinstance(built, (list, tuple)):
        for value in built:
            _rename(value, old, new)
