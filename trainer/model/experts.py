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
        offsets = torch.cumsum(batch_sizes.to(a.device), 0, dtype=torch.int32)
        return torch._grouped_mm(a, b, offs=offsets)
    outputs, start = [], 0
    for expert, rows in enumerate(batch_sizes.tolist()):
        outputs.append(a[start:start + rows] @ b[expert])
        start += rows
    return torch.cat(outputs) if outputs else a.new_zeros(0, b.shape[-1])


def install() -> None:
    """Make megatron-core's GroupedMLP use `gmm` when the grouped_gemm package is absent."""
    from megatron.core.transformer.moe import experts, grouped_gemm_util

    if grouped_gemm_util.grouped_gemm_is_available():
        return
    shim = types.SimpleNamespace(ops=types.SimpleNamespace(gmm=gmm), assert_grouped_gemm_is_available=lambda: None,
                                 grouped_gemm_is_available=lambda: True)
    experts.gg = shim
