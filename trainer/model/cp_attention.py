"""Context-parallel core attention for the TE-free layer spec: no mask, no score across samples.

megatron-core gives CP rank r two of every row's 2 x CP equal chunks, chunk r and chunk
2 x CP - 1 - r (which balances the causal work). Each rank all-gathers the keys and values of
whole rows in one collective (`gather_keys_values`; its backward one reduce-scatter) and
attends with its own queries. Within one chunk, the queries
of one packed sample see that sample's keys from its first token up to themselves: a span of
queries and a longer span of keys that end on the same token, i.e. causal attention aligned to
the lower right, flash attention's convention when the two lengths differ. Every (row, chunk,
sample) piece is such a span; flash's variable-length kernel takes all of them in one call,
with each piece's keys copied into one packed tensor (a row's early keys serve both of its
chunks: about (1 + 1 / (2 x CP)) x the row's keys in all). That copy reads the gathered keys
where the all-gather left them, rank after rank (`key_index` points there), so they are never
put back in sequence order first.

It replaced a dense [b, 1, s / CP, s] boolean mask and SDPA's memory-efficient kernel, which
computed every score, masked or not: s^2 / CP bytes of mask per row (2 GiB at 64k tokens under
CP=2) and twice the causal work (bench/README.md has the timings). The pieces are worked out
on the host from the micro-batch's sample boundaries (`rank_spans`), next to the data; on the
CPU, where torch has no variable-length kernel, the same pieces go through SDPA one by one.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def rank_positions(length: int, cp: int, rank: int) -> np.ndarray:
    """The positions in a row of CP rank `rank`'s tokens, in the order it holds them: chunk
    `rank`, then chunk 2 x CP - 1 - `rank`, of 2 x CP (megatron-core's get_batch_on_this_cp_rank)."""
    chunk = length // (2 * cp)
    return np.concatenate([np.arange(rank * chunk, (rank + 1) * chunk),
                           np.arange((2 * cp - 1 - rank) * chunk, (2 * cp - rank) * chunk)])


def gathered_positions(length: int, cp: int) -> np.ndarray:
    """For each position of a row, its place along the CP all-gather's output: the ranks' tokens
    one rank after another, each rank's in the order `rank_positions` gives."""
    places = np.empty(length, dtype=np.int64)
    places[np.concatenate([rank_positions(length, cp, r) for r in range(cp)])] = np.arange(length)
    return places


def in_gathered_order(key: torch.Tensor, value: torch.Tensor, cp: int) -> torch.Tensor:
    """Whole rows' keys and values [s, ...] in sequence order -> what `gather_keys_values` returns
    from the CP ranks' parts (for checks that hold the whole sequence on one process)."""
    both = torch.cat((key, value), dim=-1)
    return torch.cat([both[torch.from_numpy(rank_positions(both.shape[0], cp, r)).to(both.device)]
                      for r in range(cp)])


def rank_spans(cu_seqlens: np.ndarray, rows: int, length: int, cp: int, rank: int) -> dict:
    """This CP rank's attention pieces, from the samples' cumulative lengths over the micro-batch's
    rows laid end to end (`trainer.data.batches.sample_boundaries`: every row starts a sample).

    Returns numpy arrays: `query_cu` and `key_cu` (int32, [pieces + 1]: the pieces' offsets in
    this rank's queries, row after row in the order megatron-core keeps them, and in the packed
    keys), `key_index` (int64: where each packed key lies in the gathered keys [s, rows], read
    as one [s x rows] axis) and the longest piece of each, `max_query` and `max_key`."""
    chunk = length // (2 * cp)
    # positions (rows end to end) of this rank's queries, in its local order
    local = (np.arange(rows)[:, None] * length + rank_positions(length, cp, rank)).reshape(-1)
    starts = np.asarray(cu_seqlens[:-1], dtype=np.int64)
    sample = np.searchsorted(starts, local, side="right") - 1
    # a piece starts at each chunk's first query and at each sample start inside a chunk
    new_piece = np.ones(local.size, dtype=bool)
    new_piece[1:] = (sample[1:] != sample[:-1]) | (np.arange(1, local.size) % chunk == 0)
    first = np.flatnonzero(new_piece)
    last = np.append(first[1:], local.size) - 1
    query_len = last - first + 1
    key_from = starts[sample[first]]
    key_len = local[last] + 1 - key_from
    key_cu = np.concatenate([[0], np.cumsum(key_len)])
    key_at = np.arange(key_cu[-1]) - np.repeat(key_cu[:-1] - key_from, key_len)  # rows end to end
    key_index = gathered_positions(length, cp)[key_at % length] * rows + key_at // length
    return {"query_cu": np.concatenate([[0], np.cumsum(query_len)]).astype(np.int32),
            "key_cu": key_cu.astype(np.int32), "key_index": key_index,
            "max_query": int(query_len.max()), "max_key": int(key_len.max())}


def spans_on_device(spans: dict, device) -> torch.Tensor:
    """The pieces as one int32 tensor (the query offsets) carrying the rest as attributes: it
    travels to core attention in the attention mask's place, which megatron-core passes through
    untouched."""
    from trainer.data.batches import to_device

    carrier = to_device(spans["query_cu"], device)
    carrier.key_cu = to_device(spans["key_cu"], device)
    carrier.key_index = to_device(spans["key_index"], device)
    carrier.max_query, carrier.max_key, carrier.host = spans["max_query"], spans["max_key"], spans
    return carrier


def attend(query, keys_values, key_dim: int, spans: torch.Tensor, scale: float, varlen=None) -> torch.Tensor:
    """This rank's queries [s / CP, b, heads, dim] against whole rows' keys and values laid side
    by side, [s, b, kv heads, key_dim + value dim] as `gather_keys_values` returns them
    -> [s / CP, b, heads x value dim]. `varlen` is flash's variable-length attention
    (trainer.model.attention._varlen_attn), or None to attend piece by piece with SDPA."""
    local, rows, heads, dim = query.shape
    value_dim = keys_values.shape[-1] - key_dim
    q = query.transpose(0, 1).reshape(rows * local, heads, dim)
    flat = keys_values.reshape(-1, *keys_values.shape[2:])  # [s x b, ...]: the gather's own layout
    k, v = (part.index_select(0, spans.key_index) for part in (flat[..., :key_dim], flat[..., key_dim:]))
    if varlen is not None:
        if value_dim < dim:  # MLA: flash wants one width for values and keys
            v = F.pad(v, (0, dim - value_dim))
        out = varlen(q, k, v, spans, spans.key_cu, spans.max_query, spans.max_key, scale)[..., :value_dim]
    else:
        out = torch.cat([_attend_piece(q[qa:qb], k[ka:kb], v[ka:kb], scale)
                         for qa, qb, ka, kb in _pieces(spans.host)])
    return out.reshape(rows, local, heads * value_dim).transpose(0, 1).contiguous()


def _pieces(spans: dict):
    q, k = spans["query_cu"].tolist(), spans["key_cu"].tolist()
    return zip(q[:-1], q[1:], k[:-1], k[1:])


def _attend_piece(q, k, v, scale: float) -> torch.Tensor:
    """One piece through SDPA: [n, heads, dim] queries that end on the same token as their keys."""
    n, m = q.shape[0], k.shape[0]
    below_right = torch.ones(n, m, dtype=torch.bool, device=q.device).tril(diagonal=m - n)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         attn_mask=below_right, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    return out.transpose(0, 1)


class _AllGatherSequence(torch.autograd.Function):
    """All-gather along the sequence (dim 0) over the CP group, rank after rank; backward sums
    the gradient of the whole sequence over the ranks and keeps this rank's part: one
    reduce-scatter."""

    @staticmethod
    def forward(ctx, x):
        from megatron.core import parallel_state as ps

        ctx.group = ps.get_context_parallel_group()
        x = x.contiguous()
        out = x.new_empty((x.shape[0] * torch.distributed.get_world_size(ctx.group), *x.shape[1:]))
        torch.distributed.all_gather_into_tensor(out, x, group=ctx.group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        out = grad.new_empty((grad.shape[0] // torch.distributed.get_world_size(ctx.group), *grad.shape[1:]))
        torch.distributed.reduce_scatter_tensor(out, grad, group=ctx.group)
        return out


def gather_keys_values(key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """[s / CP, b, kv heads, key dim] and [.., value dim] on each rank (its two chunks) -> both
    side by side for the whole rows, [s, b, kv heads, key dim + value dim], in the all-gather's
    order (`gathered_positions`): one collective each way instead of two."""
    return _AllGatherSequence.apply(torch.cat((key, value), dim=-1))
