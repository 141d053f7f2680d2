"""Core attention through torch's scaled_dot_product_attention, for the TE-free layer spec.

megatron-core's own DotProductAttention materialises the full [b, n, s, s] score matrix
(it runs out of memory at sequence 4096 on an H100); SDPA picks flash or memory-efficient
kernels on the GPU and a fused kernel on the CPU. Packed sequences arrive as a boolean
mask (True = masked out, megatron's convention) that keeps attention inside each sample.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule


class SDPAttention(MegatronModule):
    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None, k_channels: Optional[int] = None,
                 v_channels: Optional[int] = None):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("context parallelism needs transformer-engine's attention; install moe-launcher[gpu]")
        self.attn_mask_type = attn_mask_type
        head_dim = k_channels or config.kv_channels  # MLA: query/key heads are wider than value heads
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None:
            raise ValueError("THD packed sequences need transformer-engine; the trainer packs with a mask instead")
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
