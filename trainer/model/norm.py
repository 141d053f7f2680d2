"""RMSNorm for the TE-free spec.

megatron-core's WrappedTorchNorm refuses sequence parallelism, which MoE with TP > 1
requires. With sequence parallelism each tensor-parallel rank normalises its own slice of
the sequence, so the weight's gradient is partial on each rank: marking the weight
`sequence_parallel` makes megatron-core's finalize_model_grads sum it over the TP group.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class RMSNorm(torch.nn.Module):
    def __init__(self, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                 zero_centered_gamma: bool = False, normalization: str = "RMSNorm"):
        super().__init__()
        if normalization != "RMSNorm" or zero_centered_gamma:
            raise ValueError("the TE-free spec implements plain RMSNorm only")
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        # Only norms over the hidden size see sequence-parallel slices (q/k norms are per head).
        self.weight.sequence_parallel = bool(config.sequence_parallel and hidden_size == config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """In fp32, whatever the input's precision (trainer.model.fused compiles it on GPUs)."""
    return F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps).to(x.dtype)
