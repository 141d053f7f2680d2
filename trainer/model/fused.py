"""Fused kernels for the TE-free path on GPUs.

megatron-core fuses these through transformer-engine or apex; without them every piece of
elementwise work runs as several kernels, each a pass over memory, and those passes, not the
matrix products, dominated the TE-free trainer's step (bench/README.md). On a GPU, and only
there (the CPU runs the plain code the tests check against):

- norm: RMSNorm through torch.compile (one kernel forward, one backward, fp32 inside);
- grad_accum: weight gradients of megatron-core's linear layers computed straight into the
  fp32 (or bf16) main-gradient buffer by a matrix product that adds into it, instead of a bf16
  gradient that DDP's hook then adds (megatron-core's gradient-accumulation fusion, whose
  apex kernel is replaced by torch's addmm with an fp32 output);
- adam: torch's AdamW (megatron-core's optimizer without apex or transformer-engine) through
  its fused kernel, one launch for all parameters instead of foreach's several passes;
- attention: flash attention over variable-length samples (trainer.model.attention);
- flex_attention: FlexAttention with a same-sample mask instead, for micro-batches of short
  samples (under 128 tokens on average): its kernel skips the score blocks across samples,
  where the varlen kernel pays a tile per sample (trainer.model.attention);
- permute: token permutation without host synchronisation (trainer.model.dispatch), on the
  CPU too;
- grad_norm: the gradient norm and clipping of megatron-core's optimizer as two foreach
  kernels. Its fallback without apex or transformer-engine reads every gradient's norm on the
  host (a synchronisation per tensor: 76 a step on the 8-layer benchmark model, found by the
  profile's host waits) and scales gradients one by one. On the CPU too;
- output_loss: the output layer and the cross-entropy in chunks of tokens, never holding the
  logits (trainer.model.output_loss). On the CPU too.
- response_logits: the output layer and loss over the response tokens alone, whose number
  the host counted when it collated the micro-batch (trainer.model.output_loss). On the CPU too.
- clip: the optimizer step without the host reading the gradient norm (trainer.optimizer_step):
  the clip factor stays on the GPU and reaches the fused AdamW kernel. On the CPU too.
- grad_add: the bf16 gradients that autograd hands megatron-core's DDP (experts, embedding,
  output layer, norms, router) added into the fp32 main gradient by one vectorised kernel, from
  a hook that runs before DDP's. torch's own add of a bf16 tensor into an fp32 one casts element
  by element without vector loads: about half the memory bandwidth, 23 of 269 GPU-ms a step of
  the Qwen3-30B-A3B slice (bench/README.md). The hook runs on the CPU too (a plain add there),
  so the CPU tests train through it.
- gc_freeze: not a kernel, but switched the same way for the benchmark's before/after rows:
  everything alive once setup is done is kept from the garbage collector's walks
  (trainer.gc_pauses). On the CPU too.

With transformer-engine (trainer.model.build) its own layers, attention, optimizer and gradient
norm replace most of the above (the experts, the token permutation, FlexAttention for short
samples, the output loss and grad_add stay the trainer's), and
megatron-core's fusions through it are turned on: rope, swiglu (bias_activation_fusion),
cross_entropy and router.

MOE_PLAIN_KERNELS=norm,adam,... turns pieces off, for the benchmark's before/after rows.

Measured and dropped (bench/README.md): torch.compile of megatron-core's rotary embedding and
megatron-core's native fused cross-entropy gave no speed on one H200 (within run-to-run noise,
and the fused cross-entropy took 4 GiB more): their launch overhead cost what they saved.
"""

from __future__ import annotations

import os
import types

import torch

KERNELS = ("attention", "flex_attention", "norm", "grad_accum", "grad_add", "adam", "permute", "grad_norm",
           "output_loss", "response_logits", "clip", "rope", "swiglu", "cross_entropy", "router", "gc_freeze")
ON_CPU_TOO = ("permute", "grad_norm", "output_loss", "response_logits", "clip", "grad_add", "gc_freeze")


def enabled(name: str) -> bool:
    if name in os.environ.get("MOE_PLAIN_KERNELS", "").split(","):
        return False
    return torch.cuda.is_available() or name in ON_CPU_TOO


def install() -> None:
    """Swap in the fused pieces that are enabled (idempotent)."""
    if enabled("permute"):
        from trainer.model import dispatch

        dispatch.install()
    if enabled("grad_norm"):
        from megatron.core.optimizer import clip_grads

        if clip_grads.l2_norm_impl.__module__ == "megatron.core.utils":  # megatron-core's own fallback
            clip_grads.l2_norm_impl, clip_grads.multi_tensor_scale_impl = l2_norm, scale
    if enabled("norm"):
        from trainer.model import norm

        norm.rms_norm = _compiled(norm.rms_norm)
    if enabled("grad_accum"):
        from megatron.core.tensor_parallel import layers

        if not layers._grad_accum_fusion_available:
            layers.fused_weight_gradient_mlp_cuda = types.SimpleNamespace(
                wgrad_gemm_accum_fp32=wgrad_accumulate, wgrad_gemm_accum_fp16=wgrad_accumulate)
            layers._grad_accum_fusion_available = True


def fuse_adam(optimizer) -> None:
    """Switch torch AdamW optimizers inside megatron-core's (chained) optimizer to the fused
    kernel; read at each step, so setting it after construction is enough."""
    if not enabled("adam"):
        return
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(part, "optimizer", None)
        if isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
            for group in inner.param_groups:
                group.update(foreach=False, fused=True)


def l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """The L2 norm of all tensors of tensor_lists[0], as a 1-element fp32 tensor on their
    device (megatron-core's multi_tensor_l2norm contract), without reading it on the host."""
    return foreach_norm(tensor_lists[0]).reshape(1), None


def foreach_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all `tensors` together, in fp32, as a 0-dim tensor on their device."""
    norms = torch._foreach_norm([t.float() if t.dtype != torch.float32 else t for t in tensors])
    return torch.linalg.vector_norm(torch.stack(norms))


def scale(chunk_size, noop_flag, tensor_lists, factor):
    """tensor_lists[1][i] = tensor_lists[0][i] * factor, in two foreach kernels."""
    sources, targets = tensor_lists
    if all(a is b for a, b in zip(sources, targets)):
        torch._foreach_mul_(targets, factor)
    else:
        torch._foreach_copy_(targets, torch._foreach_mul(sources, factor))


def _compiled(fn):
    if getattr(fn, "compiled_by_trainer", False):
        return fn
    compiled = torch.compile(fn, dynamic=False)
    compiled.compiled_by_trainer = True
    return compiled


def wgrad_accumulate(inputs: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """main_grad += grad_output^T @ inputs, in main_grad's precision, with no bf16 weight
    gradient in between (inputs: [tokens, in], grad_output: [tokens, out])."""
    if main_grad.dtype == inputs.dtype:
        main_grad.addmm_(grad_output.t(), inputs)
    else:  # bf16 operands, fp32 accumulator and output
        torch.addmm(main_grad, grad_output.t(), inputs, main_grad.dtype, out=main_grad)


def add_grads_by_hook(model_chunks) -> None:
    """Add each trainable parameter's gradient into its main gradient (megatron-core's DDP
    buffer) from a hook that autograd runs before DDP's own, and tell DDP so through the flag
    it reads (`grad_added_to_main_grad`, which it clears every step). Parameters whose weight
    gradient megatron-core's linear layers already accumulate (gradient-accumulation fusion)
    arrive with that flag set by the layer and a placeholder gradient: left to it. A parameter
    whose gradient this hook added once in a step keeps its flag for the step's next
    micro-batches, so the hook marks the parameters it owns."""
    if not enabled("grad_add"):
        return
    for chunk in model_chunks:
        for param in chunk.parameters():
            if param.requires_grad and getattr(param, "main_grad", None) is not None:
                param.register_hook(_adds_into_main_grad(param))


def _adds_into_main_grad(param):
    def hook(grad):
        if getattr(param, "zero_out_wgrad", False):  # DDP adds these whatever the flag says
            return grad
        if param.grad_added_to_main_grad and not getattr(param, "main_grad_added_by_hook", False):
            return grad  # a layer accumulated it (gradient-accumulation fusion); grad is a placeholder
        add_into(param.main_grad, grad)
        param.grad_added_to_main_grad = param.main_grad_added_by_hook = True
        return grad

    return hook


def add_into(total: torch.Tensor, part: torch.Tensor) -> None:
    """total += part, for an fp32 `total` and a bf16 `part` on the GPU through one Triton
    kernel with vector loads; torch's add_ otherwise."""
    if not (total.is_cuda and total.dtype == torch.float32 and part.dtype == torch.bfloat16
            and total.is_contiguous() and part.is_contiguous() and total.shape == part.shape):
        total.add_(part)
        return
    import triton

    block = 4096
    _bf16_add_kernel()[(triton.cdiv(total.numel(), block),)](total, part, total.numel(), BLOCK=block, num_warps=8)


_KERNEL = []


def _bf16_add_kernel():
    if not _KERNEL:
        import triton
        import triton.language as tl

        @triton.jit
        def bf16_add(total_ptr, part_ptr, count, BLOCK: tl.constexpr):
            offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            inside = offsets < count
            total = tl.load(total_ptr + offsets, mask=inside)
            part = tl.load(part_ptr + offsets, mask=inside).to(tl.float32)
            tl.store(total_ptr + offsets, total + part, mask=inside)

        _KERNEL.append(bf16_add)
    return _KERNEL[0]
