"""Core attention through torch's scaled_dot_product_attention, for the TE-free layer spec.

megatron-core's own DotProductAttention materialises the full [b, n, s, s] score matrix
(it runs out of memory at sequence 4096 on an H100); SDPA picks flash or memory-efficient
kernels on the GPU and a fused kernel on the CPU.

Packed samples arrive as sample boundaries: an int32 tensor of cumulative sample lengths over
the micro-batch's tokens, row after row (what flash attention's variable-length kernel takes).
On a GPU, torch's `varlen_attn` then attends inside each sample and never computes a score
across two (FlexAttention for rows of many short samples); elsewhere the same boundaries become
a dense mask for SDPA. megatron-core passes the attention mask through to core attention
untouched, so the int32 boundaries travel in its place. Under context parallelism they arrive
as this rank's pieces of each sample (trainer.model.cp_attention).

With transformer-engine, its own core attention runs, except on micro-batches of short samples,
where FlexAttention is faster than its fused kernels (`te_attention_for_short_samples`).
"""

from __future__ import annotations

import inspect
import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from trainer.model import fused


# FlexAttention for micro-batches whose samples average fewer tokens than one of its score
# blocks (128): one layer's forward and backward on an H100 (bench/attention_packed.py), ~20-token
# samples 4.1 ms against varlen's 4.6, ~800-token samples 6.1 against 4.3, 4096-token 10.3 against 8.2.
FLEX_BELOW = 128


class SDPAttention(MegatronModule):
    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None, k_channels: Optional[int] = None,
                 v_channels: Optional[int] = None):
        super().__init__(config=config)
        self.cp_size = config.context_parallel_size
        self.attn_mask_type = attn_mask_type
        head_dim = k_channels or config.kv_channels  # MLA: query/key heads are wider than value heads
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None:
            raise ValueError("THD packed sequences need transformer-engine; the trainer packs with sample "
                             "boundaries instead")
        if self.cp_size > 1:
            return self._attend_context_parallel(query, key, value, attention_mask)
        if attention_mask is not None and attention_mask.dtype == torch.int32:
            if query.is_cuda and value.shape[-1] == query.shape[-1] and flex_suits(attention_mask):
                return self._attend_flex(query, key, value, attention_mask)
            if query.is_cuda and _varlen_attn() is not None:
                return self._attend_samples(query, key, value, attention_mask)
            attention_mask = boundaries_to_mask(attention_mask, query.shape[1], query.shape[0])
        # [s, b, heads, dim] -> [b, heads, s, dim]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if k.shape[1] != q.shape[1]:  # grouped-query attention: share each key/value head
            repeat = q.shape[1] // k.shape[1]
            k = k.repeat_interleave(repeat, dim=1)
            v = v.repeat_interleave(repeat, dim=1)
        if attention_mask is not None and attention_mask.dtype == torch.bool and attention_mask.shape[-1] > 1:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=~attention_mask, scale=self.softmax_scale,
                                                 dropout_p=self.dropout if self.training else 0.0)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale,
                                                 dropout_p=self.dropout if self.training else 0.0)
        b, n, s, d = out.shape
        return out.permute(2, 0, 1, 3).reshape(s, b, n * d)

    def _attend_samples(self, query, key, value, cu_seqlens):
        """Flash attention over variable-length samples: [s, b, heads, dim] -> [s, b, heads x dim]."""
        s, b, heads, dim = query.shape
        value_dim = value.shape[-1]
        if value_dim < dim:  # MLA: values are narrower than queries and keys; flash wants one width
            value = F.pad(value, (0, dim - value_dim))
        q, k, v = (t.transpose(0, 1).reshape(b * s, t.shape[2], dim) for t in (query, key, value))
        # the longest sample sizes the kernel's grid (the row length is a safe bound)
        longest = getattr(cu_seqlens, "max_seqlen", s)
        out = _varlen_attn()(q, k, v, cu_seqlens, cu_seqlens, longest, longest, self.softmax_scale)
        return out[..., :value_dim].reshape(b, s, heads * value_dim).transpose(0, 1).contiguous()

    def _attend_context_parallel(self, query, key, value, spans):
        from trainer.model import cp_attention

        if getattr(spans, "key_index", None) is None:
            raise ValueError("context parallelism without transformer-engine needs the micro-batch's sample "
                             "pieces of this rank (trainer.loop.on_this_cp_rank)")
        keys_values = cp_attention.gather_keys_values(key, value)
        varlen = _varlen_attn() if query.is_cuda else None
        return cp_attention.attend(query, keys_values, key.shape[-1], spans, self.softmax_scale, varlen)

    def _attend_flex(self, query, key, value, boundaries):
        """FlexAttention with a same-sample causal mask: [s, b, heads, dim] -> [s, b, heads x dim].
        Its kernel skips every 128 x 128 block of scores that lies across samples, so rows of many
        short samples cost a few diagonal blocks each, where the varlen kernel pays a whole tile
        per sample. The block mask is built once per micro-batch (every layer gets the same
        boundaries tensor) from the samples' index of each token."""
        s, b, heads, _ = query.shape
        block_mask = getattr(boundaries, "block_mask", None)
        if block_mask is None:
            block_mask = boundaries.block_mask = _document_mask(boundaries.sample_ids)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out = _flex(q.is_cuda)(q, k, v, block_mask=block_mask, scale=self.softmax_scale,
                               enable_gqa=k.shape[1] != q.shape[1])
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)


def flex_suits(boundaries: torch.Tensor) -> bool:
    """Whether FlexAttention takes this micro-batch (short samples), when enabled."""
    return fused.enabled("flex_attention") and getattr(boundaries, "mean_sample", FLEX_BELOW) < FLEX_BELOW


def prepare_block_mask(boundaries) -> None:
    """Build the micro-batch's FlexAttention block mask now, when it will take it: `boundaries`
    carries the samples' index of each token (the TE-free boundaries, or transformer-engine's
    packed-sequence parameters). The trainer does so when it fetches the micro-batch, while the
    GPU still runs the previous step: built by the first layer instead, its host work (a few
    milliseconds) left the GPU idle."""
    if flex_suits(boundaries) and boundaries.sample_ids.is_cuda and getattr(boundaries, "block_mask", None) is None:
        boundaries.block_mask = _document_mask(boundaries.sample_ids)


_TE_ATTENTION = []


def te_attention_for_short_samples():
    """transformer-engine's core attention, except on micro-batches of short packed samples,
    which go through FlexAttention as on the TE-free path: cuDNN's fused attention over packed
    (THD) samples of 8-32 tokens took 42 of 205 GPU-ms a step of the 8-layer benchmark model.
    With FlexAttention the TE step ran 13% faster there and 7% on the Qwen3-30B-A3B slice
    (bench/README.md). Such a micro-batch arrives with a block mask on its packed-sequence
    parameters (collate, then `prepare_block_mask`)."""
    if not _TE_ATTENTION:
        from megatron.core.extensions.transformer_engine import TEDotProductAttention

        class TEAttention(TEDotProductAttention):
            def forward(self, query, key, value, attention_mask, *args, packed_seq_params=None, **kwargs):
                if getattr(packed_seq_params, "block_mask", None) is None:
                    return super().forward(query, key, value, attention_mask, *args,
                                           packed_seq_params=packed_seq_params, **kwargs)
                scale = self.config.softmax_scale or query.shape[-1] ** -0.5
                return attend_packed_rows(query, key, value, packed_seq_params, scale)

        _TE_ATTENTION.append(TEAttention)
    return _TE_ATTENTION[0]


def attend_packed_rows(query, key, value, packed_seq_params, scale: float) -> torch.Tensor:
    """FlexAttention over THD micro-batches: [rows x length, heads, dim] -> [rows x length,
    heads x dim], each row's samples under the packed-sequence parameters' block mask (built
    from `sample_ids` [rows, length]: no sample crosses a row)."""
    rows, length = packed_seq_params.sample_ids.shape
    block_mask = getattr(packed_seq_params, "block_mask", None)
    if block_mask is None:
        block_mask = _document_mask(packed_seq_params.sample_ids)
    q, k, v = (t.view(rows, length, *t.shape[1:]).transpose(1, 2) for t in (query, key, value))
    out = _flex(q.is_cuda)(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    return out.transpose(1, 2).reshape(query.shape[0], -1)


def boundaries_to_mask(cu_seqlens: torch.Tensor, rows: int, length: int) -> torch.Tensor:
    """The boolean mask [b, 1, s, s] (True = masked out) that sample boundaries describe."""
    positions = torch.arange(rows * length, device=cu_seqlens.device)
    sample = (torch.searchsorted(cu_seqlens, positions, right=True) - 1).view(rows, length)
    causal = torch.ones(length, length, dtype=torch.bool, device=cu_seqlens.device).tril()
    return ~(causal & (sample[:, :, None] == sample[:, None, :]))[:, None]


def _document_mask(sample: torch.Tensor):
    """FlexAttention's block mask for [b, s] sample indices: causal, inside each sample."""
    from torch.nn.attention.flex_attention import create_block_mask

    def same_sample_causal(row, head, q, kv):
        return (q >= kv) & (sample[row, q] == sample[row, kv])

    rows, length = sample.shape
    return create_block_mask(same_sample_causal, rows, None, length, length, device=sample.device,
                             _compile=sample.is_cuda)


_FLEX = {}


def _flex(on_gpu: bool):
    """flex_attention, compiled on the GPU (its Triton kernel); eager elsewhere, where it computes
    the masked scores in full: the reference the tests compare against."""
    if on_gpu not in _FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX[on_gpu] = torch.compile(flex_attention, dynamic=False) if on_gpu else flex_attention
    return _FLEX[on_gpu]


_VARLEN = []


def _varlen_attn():
    """torch's flash varlen attention as f(q, k, v, cu_q, cu_k, max_q, max_k, scale), causal (aligned
    to the lower right where a piece has more keys than queries), with grouped-query heads; None
    where torch lacks it or MOE_PLAIN_KERNELS names `attention`.
    Its keyword arguments changed between torch releases (is_causal, then window_size; scale
    and enable_gqa later), so they are read off its signature."""
    if _VARLEN:
        return _VARLEN[0]
    fn = None
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        varlen_attn = None
    if varlen_attn is not None and fused.enabled("attention"):
        params = inspect.signature(varlen_attn).parameters

        def fn(q, k, v, cu_q, cu_k, max_q, max_k, scale):
            kwargs = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
            if "scale" in params:
                kwargs["scale"] = scale
            else:  # the kernel's own scale is 1/sqrt(dim)
                q = q * (scale * math.sqrt(q.shape[-1]))
            if k.shape[1] != q.shape[1]:
                if "enable_gqa" in params:
                    kwargs["enable_gqa"] = True
                else:
                    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
                    v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
            return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)
    _VARLEN.append(fn)
    return fn
