"""Qwen3-MoE: grouped-query attention with per-head RMSNorm on queries and keys (q_norm,
k_norm), routed experts without a shared one, optional dense layers (mlp_only_layers): Qwen2-MoE's
layer layout (qwen2_moe.qwen_rules) with the q/k norms."""

from trainer.convert.families.qwen2_moe import qwen_rules


def rules(c: dict, mtp: bool = False):
    return qwen_rules(c, bias=bool(c.get("attention_bias", False)), qk_norm=True), []
