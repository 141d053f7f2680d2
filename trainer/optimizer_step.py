"""The optimizer step without the host waiting for the GPU.

megatron-core's step reads the gradient norm on the host (`.item()`) to decide whether to clip.
The host waits there for the whole backward pass, and the GPU then idles while the host
launches the optimizer's kernels and the next step's first ones (bench/README.md, the slice's
profile). Here the norm and the clip factor stay on the device: the factor reaches torch's
fused AdamW as its `grad_scale` (the kernel divides each gradient by it as it reads it, so
clipping costs no pass over memory of its own), or scales the gradients in one foreach kernel
for other optimizers. The loop reads the norm with the step's other numbers, a step later.

megatron-core's own step stays where the host must decide: loss scaling (fp16 skips a step
that overflowed), optimizer offload (the gradients live on the host) and counting zero
gradients.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from trainer import devices
from trainer.model import fused


def step(optimizer) -> tuple[bool, torch.Tensor | None]:
    """One optimizer step: (whether it updated the weights, the gradient norm on the device,
    before clipping; None for a skipped step)."""
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    if not (fused.enabled("clip") and all(_decides_on_device(part) for part in parts)):
        ok, norm, _ = optimizer.step()
        return ok, None if norm is None else torch.full((), float(norm), device=devices.device())
    optimizer.prepare_grads()  # the main gradients from the model's; without loss scaling nothing to skip
    norm = grad_norm(parts)
    for part in parts:
        if part.config.clip_grad > 0 and not getattr(part, "is_stub_optimizer", False):
            _clip(part, torch.clamp(part.config.clip_grad / (norm + 1.0e-6), max=1.0))
    return optimizer.step_with_ready_grads(), norm


def _decides_on_device(part) -> bool:
    config = part.config
    return (getattr(part, "grad_scaler", None) is None and not config.log_num_zeros_in_grad
            and not getattr(config, "optimizer_cpu_offload", False))


def grad_norm(parts) -> torch.Tensor:
    """The L2 norm of all main gradients, each part's squares summed over its statistics group
    (megatron-core's get_grad_norm: one group shared, or several combined)."""
    squares = []
    for part in parts:
        grads = part.get_main_grads_for_grad_norm()
        square = torch.zeros((), dtype=torch.float32, device=devices.device())
        if grads:
            square = fused.foreach_norm(grads).square()
        dist.all_reduce(square, group=part.get_grad_stats_parallel_group())
        squares.append(square)
    return torch.stack(squares).sum().sqrt()


def _clip(part, factor: torch.Tensor) -> None:
    inner = getattr(part, "optimizer", None)
    if isinstance(inner, torch.optim.Adam | torch.optim.AdamW) \
            and all(group.get("fused") for group in inner.param_groups):
        inner.grad_scale = 1.0 / factor  # read by its next step()
        return
    decoupled = getattr(part.config, "use_precision_aware_optimizer_no_fp8_or_ds_fp8", False)
    grads = [grad for param in part.get_parameters()
             if (grad := param.decoupled_grad if decoupled else param.grad) is not None]
    if grads:
        torch._foreach_mul_(grads, factor)
