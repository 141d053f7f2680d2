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

megatron-core's all-gather dispatcher (`token_dispatcher: allgather`) reads the tokens each local
expert got on the host, then selects them and their probabilities with `masked_select`: three
waits a MoE layer. Here it waits once, for the count, and not at all with the experts padded to
capacity (`_allgather_dispatch`).
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
    order = set_entries(routing_map, num_out_tokens)
    sorted_indices = order % num_tokens  # the token of each routed copy
    by_token = torch.argsort(sorted_indices, stable=True)  # the copies grouped by token
    permuted_probs = probs.T.reshape(-1).index_select(0, order) if probs is not None else None
    permuted = _Gather.apply(tokens, sorted_indices, by_token, topk)
    sorted_indices.copies_by_token = (by_token, topk)  # read back by unpermute
    return permuted, permuted_probs, sorted_indices


def set_entries(routing_map: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` set entries of the [experts, tokens] map, flattened, expert-major and in token
    order within an expert (megatron-core's order): a stable sort of "not set"."""
    return torch.argsort((~routing_map.T.reshape(-1)).to(torch.uint8), stable=True)[:count]


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
    _allgather_dispatch(token_dispatcher.MoEAllGatherTokenDispatcher)
    dispatcher.sync_free = True


def _allgather_dispatch(dispatcher) -> None:
    """megatron-core's all-gather dispatcher with one host wait a MoE layer, or none.

    Each rank gathers every token of its expert group, runs its experts on the tokens routed to
    them and reduces the partial sums back: against the all-to-all it moves each token once to
    every other rank instead of once per routed copy - (EP - 1) x tokens rows each way against
    top-k x (EP - 1) / EP x tokens, less when EP is below top-k (README, "Padding experts to
    capacity"). megatron-core reads the local experts' counts on the host, then selects the
    tokens and their probabilities with `masked_select`, which waits for the GPU each time; here
    the tokens come from the local map's `set_entries`, as in `permute`, after one read of the
    counts (the size of the experts' input) - or none with the experts padded to capacity: the
    router has then marked exactly `capacity` tokens of its rank for every expert (megatron-core's
    apply_router_token_dropping), so the gathered map holds that many times the ranks for each.

    The partial sums come back in bf16, where megatron-core reduces them in the router's fp32: a
    third fewer bytes in all, and with two ranks the same result (one addition, rounded once
    either way)."""
    postprocess, combine = dispatcher.dispatch_postprocess, dispatcher.token_combine

    def ours(self) -> bool:
        return not self.config.moe_permute_fusion

    def local_postprocess(self, hidden_states, probs):
        if not ours(self):
            return postprocess(self, hidden_states, probs)
        config = self.config
        first, last = self.local_expert_indices[0], self.local_expert_indices[-1] + 1
        self.hidden_shape_before_permute = hidden_states.shape
        self.local_map = self.routing_map[:, first:last].contiguous()
        local_probs, self.routing_map = probs[:, first:last], None
        if config.moe_pad_expert_input_to_capacity:
            from megatron.core.transformer.moe import moe_utils

            ranks = self.tp_size * self.ep_size
            rank_tokens = hidden_states.shape[0] // ranks  # what each rank's router routed
            # the router marks every token when the capacity exceeds them (megatron-core's rule)
            capacity = ranks * min(rank_tokens, moe_utils.get_capacity(
                rank_tokens * config.moe_router_topk, config.num_moe_experts, config.moe_expert_capacity_factor))
            permuted, self.local_probs, self.reversed_local_input_permutation_mapping = moe_utils.permute(
                hidden_states, self.local_map, probs=local_probs, drop_and_pad=True,
                num_out_tokens=capacity * self.num_local_experts)
            return permuted, torch.full((self.num_local_experts,), capacity, dtype=torch.long), self.local_probs
        tokens_per_expert = self.local_map.sum(dim=0).cpu()  # the one wait: how many rows the experts get
        entries = set_entries(self.local_map, int(tokens_per_expert.sum()))
        rows = entries % hidden_states.shape[0]
        self.local_probs = local_probs.T.reshape(-1).index_select(0, entries)
        self.reversed_local_input_permutation_mapping = rows
        return hidden_states.index_select(0, rows), tokens_per_expert, self.local_probs

    def bf16_combine(self, hidden_states):
        if not ours(self) or self.tp_size * self.ep_size == 1:
            return combine(self, hidden_states)
        from megatron.core.tensor_parallel import reduce_scatter_to_sequence_parallel_region

        return reduce_scatter_to_sequence_parallel_region(hidden_states, group=self.tp_ep_group)

    dispatcher.dispatch_postprocess = local_postprocess
    dispatcher.token_combine = bf16_combine


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
