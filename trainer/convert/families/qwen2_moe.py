"""Qwen2-MoE: attention with QKV bias; routed experts plus one shared expert whose output is
scaled by a sigmoid gate (`shared_expert_gate`); optional dense layers (mlp_only_layers).
Qwen3-MoE has the same layers without the shared expert (see qwen3_moe)."""

from trainer.model.hf_config import num_experts
from trainer.convert.families.common import copy, dense_layers, glu, gqa_attention, outer, routed_experts


def rules(c: dict, mtp: bool = False):
    return qwen_rules(c, bias=c.get("qkv_bias", True), qk_norm=False), []


def qwen_rules(c: dict, bias: bool, qk_norm: bool) -> list:
    out = outer(c)
    dense = dense_layers(c)
    for i in range(c["num_hidden_layers"]):
        m, h = f"decoder.layers.{i}", f"model.layers.{i}"
        out += gqa_attention(m, h, c, bias=bias, qk_norm=qk_norm)
        if i in dense:  # transformer-engine's dense MLP holds the norm before it
            out.append(copy(f"{m}.mlp.linear_fc1.layer_norm_weight", f"{h}.post_attention_layernorm.weight"))
            out += glu(f"{m}.mlp", f"{h}.mlp")
            continue
        out.append(copy(f"{m}.pre_mlp_layernorm.weight", f"{h}.post_attention_layernorm.weight"))
        out.append(copy(f"{m}.mlp.router.weight", f"{h}.mlp.gate.weight"))
        out += routed_experts(m, f"{h}.mlp.experts", num_experts(c))
        if c.get("shared_expert_intermediate_size"):
            out += glu(f"{m}.mlp.shared_experts", f"{h}.mlp.shared_expert")
            out.append(copy(f"{m}.mlp.shared_experts.gate_weight", f"{h}.mlp.shared_expert_gate.weight"))
    return out
