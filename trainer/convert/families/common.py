"""Mapping rules shared by the families: one megatron-core tensor from one or more Hugging Face
tensors, and back.

megatron-core keys are those of the trainer's checkpoint format (trainer.checkpoint.MODEL_FORMAT):
one key per layer and per expert, GLU weights as separate gate (`_w`) and up (`_v`) halves, so
nearly every rule is a plain copy. The exception is attention's fused QKV projection, which
megatron-core lays out group by group: for each key/value head, its query heads, then its key,
then its value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass(frozen=True)
class Rule:
    mcore: str
    hf: tuple[str, ...]
    join: Optional[Callable[[list[torch.Tensor]], torch.Tensor]] = None  # hf tensors -> mcore; None: copy
    split: Optional[Callable[[torch.Tensor], list[torch.Tensor]]] = None  # mcore tensor -> hf tensors

    def to_mcore(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        return self.join(tensors) if self.join else tensors[0]

    def to_hf(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        return self.split(tensor) if self.split else [tensor]


def copy(mcore: str, hf: str) -> Rule:
    return Rule(mcore, (hf,))


def qkv(mcore: str, q: str, k: str, v: str, heads: int, groups: int, head_dim: int) -> Rule:
    """q [heads*d, ...], k and v [groups*d, ...] <-> megatron-core's per-group [q..., k, v] rows
    (works for weights and biases alike)."""
    per_group = heads // groups

    def join(tensors):
        q_, k_, v_ = tensors
        rest = q_.shape[1:]
        parts = (q_.reshape(groups, per_group * head_dim, *rest), k_.reshape(groups, head_dim, *rest),
                 v_.reshape(groups, head_dim, *rest))
        return torch.cat(parts, dim=1).reshape(-1, *rest)

    def split(t):
        rest = t.shape[1:]
        grouped = t.reshape(groups, (per_group + 2) * head_dim, *rest)
        q_, k_, v_ = torch.split(grouped, [per_group * head_dim, head_dim, head_dim], dim=1)
        return [x.reshape(-1, *rest).contiguous() for x in (q_, k_, v_)]

    return Rule(mcore, (q, k, v), join, split)


def glu(mcore_prefix: str, hf_prefix: str, gate: str = "gate_proj", up: str = "up_proj",
        down: str = "down_proj") -> list[Rule]:
    """A SwiGLU MLP (dense, shared expert or routed expert)."""
    return [copy(f"{mcore_prefix}.linear_fc1.weight_w", f"{hf_prefix}.{gate}.weight"),
            copy(f"{mcore_prefix}.linear_fc1.weight_v", f"{hf_prefix}.{up}.weight"),
            copy(f"{mcore_prefix}.linear_fc2.weight", f"{hf_prefix}.{down}.weight")]


def routed_experts(mcore_layer: str, hf_experts: str, count: int, **names) -> list[Rule]:
    rules = []
    for e in range(count):
        rules += glu(f"{mcore_layer}.mlp.experts.experts.{e}", f"{hf_experts}.{e}", **names)
    return rules


def gqa_attention(mcore_layer: str, hf_layer: str, c: dict, bias: bool = False, qk_norm: bool = False) -> list[Rule]:
    """Grouped-query attention with its input norm (megatron-core files the norm under the fused
    QKV projection, as transformer-engine's layer holds it)."""
    heads = c["num_attention_heads"]
    groups = c.get("num_key_value_heads") or heads
    head_dim = c.get("head_dim") or c["hidden_size"] // heads
    a, h = f"{mcore_layer}.self_attention", f"{hf_layer}.self_attn"
    rules = [copy(f"{a}.linear_qkv.layer_norm_weight", f"{hf_layer}.input_layernorm.weight"),
             qkv(f"{a}.linear_qkv.weight", f"{h}.q_proj.weight", f"{h}.k_proj.weight", f"{h}.v_proj.weight",
                 heads, groups, head_dim),
             copy(f"{a}.linear_proj.weight", f"{h}.o_proj.weight")]
    if bias:
        rules.append(qkv(f"{a}.linear_qkv.bias", f"{h}.q_proj.bias", f"{h}.k_proj.bias", f"{h}.v_proj.bias",
                         heads, groups, head_dim))
    if qk_norm:
        rules += [copy(f"{a}.q_layernorm.weight", f"{h}.q_norm.weight"),
                  copy(f"{a}.k_layernorm.weight", f"{h}.k_norm.weight")]
    return rules


def outer(c: dict) -> list[Rule]:
    """Embedding, final norm and output layer (absent when tied to the embedding)."""
    rules = [copy("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
             copy("decoder.final_layernorm.weight", "model.norm.weight")]
    if not c.get("tie_word_embeddings", False):
        rules.append(copy("output_layer.weight", "lm_head.weight"))
    return rules


def dense_layers(c: dict) -> set[int]:
    """Layers with a dense MLP instead of experts (Qwen's mlp_only_layers)."""
    return set(c.get("mlp_only_layers") or [])
