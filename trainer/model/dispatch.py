"""Token permutation without host synchronisation or atomics, for dropless MoE without
transformer-engine.

megatron-core's unfused permutation finds each expert's tokens with `masked_select` (whose
output size the host must read: a device-to-host synchronisation per MoE layer), restores
them with `scatter_add` (bf16 atomics), and with one expert-parallel and tensor-parallel rank
still splits and re-concatenates the tokens by local expert (an identity) after reading the
tokens per expert on the host. Each synchronisation stalls the host's kernel launches, so the
GPU idles. In the dropless case every token goes to exactly top-k experts, which makes all of
it static:

- permute: a stable sort of the routing map's entries (expert-major, as megatron-core orders
  them) gives each routed copy's token; the inverse order groups the copies by token;
- unpermute: gather each token's k copies with the inverse order and sum them (no atomics);
  the backward of each is the other's forward;
- on a single EP x TP rank the dispatcher keeps tokens per expert on the GPU
  (`torch._grouped_mm` takes them there) and skips the identity re-sorting.

Token dropping (a capacity factor), padding for quantisation and transformer-engine's fused
permutation keep megatron-core's code.
"""

from __future__ import annotations

import torch


class _Gather(torch.autograd.Function):
    """rows[index], whose backward is the inverse gather summed over the top-k copies."""

    @staticmethod
    def forward(ctx, rows, index, inverse, topk: int):
        ctx.save_for_backward(inverse)
        ctx.topk = topk
        return rows.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return _sum_copies(grad, inverse, ctx.topk), None, None, None


class _SumCopies(torch.autograd.Function):
    """Each token's top-k rows summed; backward hands each copy its token's gradient."""

    @staticmethod
    def forward(ctx, rows, inverse, index, topk: int):
        ctx.save_for_backward(index)
        return _sum_copies(rows, inverse, topk)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return grad.index_select(0, index), None, None, None


def _sum_copies(rows: torch.Tensor, inverse: torch.Tensor, topk: int) -> torch.Tensor:
    grouped = rows.index_select(0, inverse).view(-1, topk, rows.shape[-1])
    wide = torch.float32 if rows.element_size() < 4 else rows.dtype  # bf16 copies add up in fp32
    return grouped.sum(dim=1, dtype=wide).to(rows.dtype)


def permute(tokens, routing_map, probs=None, num_out_tokens=None, fused=False, drop_and_pad=False):
    """megatron-core's `permute` (same outputs and order), sync-free when dropless."""
    if fused or drop_and_pad or not isinstance(num_out_tokens, int):
        from megatron.core.transformer.moe import moe_utils

        return moe_utils.permute(tokens, routing_map, probs, num_out_tokens, fused, drop_and_pad)
    num_tokens, num_experts = routing_map.shape
    topk = num_out_tokens // num_tokens
    # entries of the [experts, tokens] map that are set, in order: a stable sort of "not set"
    order = torch.argsort((~routing_map.T.reshape(-1)).to(torch.uint8), stable=True)[:num_out_tokens]
    sorted_indices = order % num_tokens  # the token of each routed copy
    by_token = torch.argsort(sorted_indices, stable=True)  # the copies grouped by token
    permuted_probs = probs.T.reshape(-1).index_select(0, order) if probs is not None else None
    permuted = _Gather.apply(tokens, sorted_indices, by_token, topk)
    sorted_indices.copies_by_token = (by_token, topk)  # read back by unpermute
    return permuted, permuted_probs, sorted_indices


def unpermute(permuted_tokens, sorted_indices, restore_shape, probs=None, routing_map=None, fused=False,
              drop_and_pad=False):
    grouping = getattr(sorted_indices, "copies_by_token", None)
    if grouping is None or probs is not None or fused or drop_and_pad:
        from megatron.core.transformer.moe import moe_utils

        return moe_utils.unpermute(permuted_tokens, sorted_indices, restore_shape, probs=probs,
                                   routing_map=routing_map, fused=fused, drop_and_pad=drop_and_pad)
    by_token, topk = grouping
    return _SumCopies.apply(permuted_tokens, by_token, sorted_indices, topk)


def install() -> None:
    """Route megatron-core's alltoall dispatcher through the functions above (idempotent)."""
    from megatron.core.transformer.moe import token_dispatcher

    dispatcher = token_dispatcher.MoEAlltoAllTokenDispatcher
    if getattr(dispatcher, "sync_free", False):
        return
    token_dispatcher.permute, token_dispatcher.unpermute = permute, unpermute
    _single_rank_without_sync(dispatcher)
    dispatcher.sync_free = True


def _single_rank_without_sync(dispatcher) -> None:
    """With EP x TP = 1 and no dropping: tokens per expert stay on the GPU, nothing waits on a
    device-to-host copy, and the by-local-expert re-sorting (an identity there) is skipped."""
    preprocess, postprocess, combine_preprocess = (dispatcher.preprocess, dispatcher.dispatch_postprocess,
                                                   dispatcher.combine_preprocess)

    def single(self) -> bool:
        config = self.config
        return (self.ep_size == 1 and self.tp_size == 1 and not self.drop_and_pad
                and config.moe_expert_capacity_factor is None and not config.moe_router_padding_for_quantization
                and not config.moe_permute_fusion)

    def single_preprocess(self, routing_map):
        if not single(self):
            return preprocess(self, routing_map)
        self.num_out_tokens = routing_map.size(0) * self.config.moe_router_topk
        self.tokens_per_expert_on_gpu = routing_map.sum(dim=0).long()
        self.cuda_dtoh_point = self.cuda_sync_point = "no_sync"  # no copy to the host, no wait
        return self.tokens_per_expert_on_gpu

    def single_postprocess(self, global_input_tokens, global_probs):
        if not single(self):
            return postprocess(self, global_input_tokens, global_probs)
        if self.shared_experts is not None:
            self.shared_experts.linear_fc1_forward_and_act(global_input_tokens)
        tokens_per_expert, self.tokens_per_expert = self.tokens_per_expert_on_gpu, None
        return global_input_tokens, tokens_per_expert, global_probs

    def single_combine_preprocess(self, hidden_states):
        return hidden_states if single(self) else combine_preprocess(self, hidden_states)

    dispatcher.preprocess = single_preprocess
    dispatcher.dispatch_postprocess = single_postprocess
    dispatcher.combine_preprocess = single_combine_preprocess
