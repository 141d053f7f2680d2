"""Mixtral: grouped-query attention, a router (`block_sparse_moe.gate`) and experts w1 (gate),
w3 (up), w2 (down)."""

from trainer.convert.families.common import copy, gqa_attention, outer, routed_experts


def rules(c: dict, mtp: bool = False):
    out = outer(c)
    for i in range(c["num_hidden_layers"]):
        m, h = f"decoder.layers.{i}", f"model.layers.{i}"
        out += gqa_attention(m, h, c)
        out += [copy(f"{m}.pre_mlp_layernorm.weight", f"{h}.post_attention_layernorm.weight"),
                copy(f"{m}.mlp.router.weight", f"{h}.block_sparse_moe.gate.weight")]
        out += routed_experts(m, f"{h}.block_sparse_moe.experts", c["num_local_experts"], gate="w1", up="w3", down="w2")
    return out, []
