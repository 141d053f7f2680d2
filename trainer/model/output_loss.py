"""The output layer and the cross-entropy loss in one pass that never holds the logits.

With a large vocabulary the logits are the largest tensor of a step: Qwen3-30B-A3B's 151,936
entries for each of the 16,384 tokens of a micro-batch of four 4096-token rows are 2.5G numbers,
10 GB in the fp32 that megatron-core computes the loss in (and again for its softmax, kept for
the backward pass). Here the tokens go through in chunks: a chunk's logits are formed, turned
into its per-token losses and the gradient of those losses with respect to the logits, and that
gradient is multiplied at once into the gradients of the hidden states and of the output weight;
then the chunk's logits are dropped. The backward pass only scales what the forward pass left.

That needs the loss's weights up front: the gradient is the one of the loss the trainer
optimises, the sum of the per-token losses over response tokens (trainer.loop.loss_func selects
loss_mask > 0). The gradient that arrives in the backward pass is then one number (megatron-core's
gradient scale, 1 in bf16) on those tokens and zero elsewhere; the output weight's gradient is
scaled by that number, the hidden states' gradients token by token.

Used where megatron-core's model would form the logits and the loss from them: the last pipeline
stage without tensor parallelism (the vocabulary split over ranks needs a reduction over them)
and without multi-token prediction (whose losses megatron-core forms inside the model). Elsewhere,
and for calls without labels or loss mask, megatron-core's own code runs.
"""

from __future__ import annotations

import torch

from launcher.plan.memory import LOGIT_ELEMENTS_PER_CHUNK  # the planner counts them
from trainer.model import fused


def install(model) -> None:
    """Route `model`'s (a GPTModel) training loss through linear_cross_entropy where it applies."""
    config = model.config
    if not (fused.enabled("output_loss") and model.post_process and config.tensor_model_parallel_size == 1
            and not config.mtp_num_layers):
        return
    compile_kernels()
    plain = model._postprocess

    def postprocess(**kwargs):
        labels, loss_mask, hidden = kwargs["labels"], kwargs["loss_mask"], kwargs["hidden_states"]
        if labels is None or loss_mask is None or kwargs.get("inference_context") is not None:
            return plain(**kwargs)
        if model.share_embeddings_and_output_weights:
            weight = model.shared_embedding_or_output_weight()
        else:
            # megatron-core's DDP finishes gathering a module's weights (overlap_param_gather) in
            # the module's forward pre-hook, which also starts the next bucket's gather; the weight
            # is used here without the module's forward, so call it on no tokens for its hooks.
            model.output_layer(hidden[:0])
            weight = model.output_layer.weight
        return linear_cross_entropy(hidden, weight, labels, loss_mask)

    model._postprocess = postprocess


def compile_kernels() -> None:
    """On a GPU, each chunk's loss and logit gradient in a reduction and one pass that writes
    the gradient: the fp32 logits are never stored. Full chunks have one shape; the last chunk
    of a micro-batch's response tokens a new one nearly every time, so it has kernels of its own,
    compiled for any number of tokens (torch.compile's automatic dynamic shapes: once static,
    once dynamic) where the static ones recompiled at every size, then ran uncompiled."""
    global _losses, _losses_and_grads, _last_losses, _last_losses_and_grads
    if torch.cuda.is_available() and not getattr(_losses, "compiled_by_trainer", False):
        _last_losses, _last_losses_and_grads = torch.compile(_losses), torch.compile(_losses_and_grads)
        _losses, _losses_and_grads = fused._compiled(_losses), fused._compiled(_losses_and_grads)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         loss_mask: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy [batch, sequence] of the logits hidden @ weight^T, for hidden
    [sequence, batch, h] and labels, loss_mask [batch, sequence] (megatron-core's layouts).
    Its gradient is right for a sum over the tokens with loss_mask > 0, as the module says.

    Where the host counted the response tokens (`loss_mask.response_tokens`, set by
    trainer.data.batches.collate), only those go through the output layer and their losses
    are zero elsewhere: in SFT data most tokens are prompt (71% of the benchmark's rows), and
    with a large vocabulary their logits were the largest matrix products of the step."""
    length, batch, width = hidden.shape
    keep = (loss_mask > 0).t().reshape(-1)
    # labels outside the mask may be anything (padding); any valid index does for them
    targets = labels.t().reshape(-1).clamp(0, weight.shape[0] - 1)
    flat = hidden.reshape(length * batch, width)
    counted = getattr(loss_mask, "response_tokens", None)
    if counted is None or not fused.enabled("response_logits"):
        return _LinearCrossEntropy.apply(flat, weight, targets, keep).view(length, batch).t()
    # the positions of the response tokens without reading the mask on the host (its count is known)
    index = torch.nonzero_static(keep, size=counted).squeeze(1)
    picked = _LinearCrossEntropy.apply(flat.index_select(0, index), weight, targets[index], keep[index])
    losses = torch.zeros(length * batch, dtype=picked.dtype, device=picked.device).index_copy(0, index, picked)
    return losses.view(length, batch).t()


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, keep):
        tokens, vocab = hidden.shape[0], weight.shape[0]
        chunk = max(128, LOGIT_ELEMENTS_PER_CHUNK // vocab // 128 * 128)
        losses = torch.empty(tokens, dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if weight.requires_grad else None
        for start in range(0, tokens, chunk):
            part = slice(start, start + chunk)
            logits = hidden[part] @ weight.t()
            full = logits.shape[0] == chunk
            if grad_hidden is None and grad_weight is None:
                losses[part] = (_losses if full else _last_losses)(logits, targets[part])
                continue
            losses[part], grad_logits = (_losses_and_grads if full else _last_losses_and_grads)(
                logits, targets[part], keep[part])
            del logits
            if grad_hidden is not None:
                torch.mm(grad_logits, weight, out=grad_hidden[part])
            if grad_weight is not None:
                fused.wgrad_accumulate(hidden[part], grad_logits, grad_weight)
        ctx.save_for_backward(grad_hidden, grad_weight, keep)
        ctx.weight_dtype = weight.dtype
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        grad_hidden, grad_weight, keep = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_losses.to(grad_hidden.dtype)[:, None]
        if grad_weight is not None:
            # the one number that arrives on every kept token (a mean, so never read on the host)
            scale = (grad_losses * keep).sum() / keep.sum().clamp(min=1)
            grad_weight = (grad_weight * scale).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None


def _losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    return torch.logsumexp(logits, dim=-1) - logits.gather(1, targets[:, None]).squeeze(1)


def _losses_and_grads(logits: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor):
    """Per-token losses, and their gradient with respect to the logits for the kept tokens
    (softmax minus the one-hot target), in the logits' dtype; fp32 inside."""
    wide = logits.float()
    log_total = torch.logsumexp(wide, dim=-1, keepdim=True)
    losses = log_total.squeeze(1) - wide.gather(1, targets[:, None]).squeeze(1)
    is_target = torch.arange(wide.shape[1], device=wide.device)[None, :] == targets[:, None]
    grads = torch.exp(wide - log_total) - is_target.to(wide.dtype)
    return losses, torch.where(keep[:, None], grads, 0.0).to(logits.dtype)


_last_losses, _last_losses_and_grads = _losses, _losses_and_grads  # compiled apart on a GPU (compile_kernels)
