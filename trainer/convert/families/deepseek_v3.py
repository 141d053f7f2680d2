"""DeepSeek-V3: multi-latent attention (compressed query and key/value projections with their
own norms, filed under the up-projections that transformer-engine fuses them into), first_k_dense_replace dense layers, then MoE layers with a router, its
aux-loss-free bias (e_score_correction_bias), routed and shared experts.

The multi-token-prediction layer is stored as one more layer after the last
(model.layers.<num_hidden_layers>): a decoder layer plus enorm, hnorm, eh_proj and a
shared_head whose norm is megatron-core's MTP final norm. Its embedding and head are
copies of the model's own, which megatron-core shares, so they are checked equal and
not stored twice.
"""

from trainer.convert.families.common import Rule, copy, glu, outer, routed_experts


def _layer(c: dict, m: str, h: str, moe: bool) -> list[Rule]:
    a, s = f"{m}.self_attention", f"{h}.self_attn"
    rules = [copy(f"{m}.input_layernorm.weight", f"{h}.input_layernorm.weight"),
             copy(f"{a}.linear_kv_down_proj.weight", f"{s}.kv_a_proj_with_mqa.weight"),
             copy(f"{a}.linear_kv_up_proj.layer_norm_weight", f"{s}.kv_a_layernorm.weight"),
             copy(f"{a}.linear_kv_up_proj.weight", f"{s}.kv_b_proj.weight"),
             copy(f"{a}.linear_proj.weight", f"{s}.o_proj.weight"),
             # transformer-engine's dense MLP holds the norm before it; an MoE layer keeps its own
             copy(f"{m}.pre_mlp_layernorm.weight" if moe else f"{m}.mlp.linear_fc1.layer_norm_weight",
                  f"{h}.post_attention_layernorm.weight")]
    if c.get("q_lora_rank"):
        rules += [copy(f"{a}.linear_q_down_proj.weight", f"{s}.q_a_proj.weight"),
                  copy(f"{a}.linear_q_up_proj.layer_norm_weight", f"{s}.q_a_layernorm.weight"),
                  copy(f"{a}.linear_q_up_proj.weight", f"{s}.q_b_proj.weight")]
    else:
        rules.append(copy(f"{a}.linear_q_proj.weight", f"{s}.q_proj.weight"))
    if not moe:
        return rules + glu(f"{m}.mlp", f"{h}.mlp")
    rules += [copy(f"{m}.mlp.router.weight", f"{h}.mlp.gate.weight"),
              copy(f"{m}.mlp.router.expert_bias", f"{h}.mlp.gate.e_score_correction_bias")]
    rules += routed_experts(m, f"{h}.mlp.experts", c["n_routed_experts"])
    if c.get("n_shared_experts"):
        rules += glu(f"{m}.mlp.shared_experts", f"{h}.mlp.shared_experts")
    return rules


def rules(c: dict, mtp: bool = False):
    """(rules, dropped): `dropped` are prefixes of Hugging Face tensors left out on purpose."""
    n = c["num_hidden_layers"]
    first_dense = c.get("first_k_dense_replace", 0)
    out = outer(c)
    for i in range(n):
        out += _layer(c, f"decoder.layers.{i}", f"model.layers.{i}", moe=i >= first_dense)
    mtp_layers = c.get("num_nextn_predict_layers") or 0
    prefixes = [f"model.layers.{n + j}." for j in range(mtp_layers)]
    if not mtp:
        return out, prefixes
    for j in range(mtp_layers):
        m, h = f"mtp.layers.{j}", f"model.layers.{n + j}"
        out += [copy(f"{m}.enorm.weight", f"{h}.enorm.weight"), copy(f"{m}.hnorm.weight", f"{h}.hnorm.weight"),
                copy(f"{m}.eh_proj.weight", f"{h}.eh_proj.weight"),
                copy(f"{m}.final_layernorm.weight", f"{h}.shared_head.norm.weight")]
        out += _layer(c, f"{m}.transformer_layer", h, moe=True)
    return out, []


def shared_copies(c: dict) -> dict[str, str]:
    """MTP tensors that duplicate one of the model's own: {mtp tensor: model tensor}."""
    n = c["num_hidden_layers"]
    copies = {}
    for j in range(c.get("num_nextn_predict_layers") or 0):
        copies[f"model.layers.{n + j}.embed_tokens.weight"] = "model.embed_tokens.weight"
        copies[f"model.layers.{n + j}.shared_head.head.weight"] = "lm_head.weight"
    return copies
