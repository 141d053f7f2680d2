"""Hugging Face config.json -> megatron-core TransformerConfig fields, one table per family.

Every key of config.json is either mapped, known not to matter for training (token ids,
versions, dtype names), or refused by name: a field we would silently ignore could change
the model (a sliding window, a RoPE scaling, another activation).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Keys that do not change the computation we train (ids, bookkeeping, inference-only).
IGNORED = {
    "architectures", "auto_map", "bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype", "dtype",
    "transformers_version", "use_cache", "initializer_range", "output_router_logits", "pretraining_tp",
    "model_type", "max_window_layers", "ep_size", "topk_method", "seq_aux", "quantization_config",
    "router_jitter_noise", "tokenizer_class", "_name_or_path", "layer_types",
}
# Keys whose value must be the neutral one, since the trainer does not implement the others.
REQUIRED_VALUES = {
    "hidden_act": ("silu",),
    "attention_dropout": (0, 0.0),
    "use_sliding_window": (False,),
    "sliding_window": (None,),  # checked only where use_sliding_window is absent (Mixtral)
    "decoder_sparse_step": (1,),
    "moe_layer_freq": (1,),
    "scoring_func": ("sigmoid",),  # DeepSeek-V3
}


class UnsupportedConfig(ValueError):
    pass


@dataclass
class ModelArgs:
    """What build_model needs: TransformerConfig fields plus GPTModel arguments."""

    family: str
    transformer: dict = field(default_factory=dict)  # TransformerConfig / MLATransformerConfig fields
    vocab_size: int = 0
    max_position_embeddings: int = 4096
    rotary_base: float = 10000.0
    tie_embeddings: bool = False
    mla: bool = False
    mtp_layers: int = 0  # multi-token-prediction layers in the checkpoint (trained with model.enable_mtp)


def _rope_in_old_form(config: dict) -> dict:
    """transformers 5 writes `rope_parameters` (theta, type and scaling in one dict) where the
    released configs have rope_theta and rope_scaling; read both."""
    if "rope_parameters" not in config:
        return config
    config = dict(config)
    rope = dict(config.pop("rope_parameters") or {})
    if "rope_theta" in rope:
        config["rope_theta"] = rope.pop("rope_theta")
    if rope.get("rope_type", "default") != "default":
        config["rope_scaling"] = rope
    return config


def model_args(config: dict, source: str = "config.json") -> ModelArgs:
    config = _rope_in_old_form(config)
    family = config.get("model_type")
    if family not in _FAMILIES:
        raise UnsupportedConfig(f"{source}: model_type '{family}' is not supported "
                                f"(supported: {', '.join(_FAMILIES)})")
    mapped, build = _FAMILIES[family]
    for key, value in config.items():
        if key in IGNORED or key in mapped:
            continue
        if key in REQUIRED_VALUES:
            if key == "sliding_window" and config.get("use_sliding_window") is False:
                continue
            if value not in REQUIRED_VALUES[key]:
                raise UnsupportedConfig(f"{source}: {key}={value!r} is not supported "
                                        f"(only {REQUIRED_VALUES[key][0]!r})")
            continue
        raise UnsupportedConfig(f"{source}: {key} is not supported by the trainer's {family} mapping; "
                                "remove it if it does not change the model")
    return build(config)


def _common(c: dict) -> dict:
    heads = c["num_attention_heads"]
    return {
        "num_layers": c["num_hidden_layers"],
        "hidden_size": c["hidden_size"],
        "ffn_hidden_size": c["intermediate_size"],
        "num_attention_heads": heads,
        "num_query_groups": c.get("num_key_value_heads") or heads,
        "kv_channels": c.get("head_dim") or c["hidden_size"] // heads,
        "normalization": "RMSNorm",
        "layernorm_epsilon": c.get("rms_norm_eps", 1e-6),
        "gated_linear_unit": True,
        "add_bias_linear": False,
        "add_qkv_bias": bool(c.get("attention_bias", False)),
        "moe_router_topk": c["num_experts_per_tok"],
        "moe_aux_loss_coeff": c.get("router_aux_loss_coef", 0.0),
        "moe_router_load_balancing_type": "aux_loss",
        "moe_router_dtype": "fp32",
    }


def _args(c: dict, family: str, transformer: dict, **extra) -> ModelArgs:
    if c.get("rope_scaling") is not None and family != "deepseek_v3":
        raise UnsupportedConfig(f"config.json: rope_scaling={c['rope_scaling']!r} is not supported for {family}")
    return ModelArgs(family=family, transformer=transformer, vocab_size=c["vocab_size"],
                     max_position_embeddings=c.get("max_position_embeddings", 4096),
                     rotary_base=float(c.get("rope_theta", 10000.0)),
                     tie_embeddings=bool(c.get("tie_word_embeddings", False)), **extra)


def _moe_layer_pattern(c: dict) -> list[int]:
    dense = set(c.get("mlp_only_layers") or [])
    return [0 if i in dense else 1 for i in range(c["num_hidden_layers"])]


_COMMON_KEYS = {"num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "attention_bias", "num_experts_per_tok",
                "router_aux_loss_coef", "vocab_size", "max_position_embeddings", "rope_theta",
                "tie_word_embeddings", "rope_scaling"}


def num_experts(c: dict) -> int:
    """Qwen's released configs say num_experts; transformers 5 writes num_local_experts."""
    return c.get("num_experts") or c["num_local_experts"]


def _mixtral(c: dict) -> ModelArgs:
    t = _common(c)
    # Mixtral: top-k on the router logits, then softmax over the chosen k.
    t.update(num_moe_experts=c["num_local_experts"], moe_ffn_hidden_size=c["intermediate_size"],
             moe_router_pre_softmax=False)
    return _args(c, "mixtral", t)


def _qwen2_moe(c: dict) -> ModelArgs:
    t = _common(c)
    t.update(add_qkv_bias=c.get("qkv_bias", True), num_moe_experts=num_experts(c),
             moe_ffn_hidden_size=c["moe_intermediate_size"],
             # softmax over all experts, then top-k; renormalised only with norm_topk_prob
             moe_router_pre_softmax=not c.get("norm_topk_prob", False),
             moe_layer_freq=_moe_layer_pattern(c))
    if c.get("shared_expert_intermediate_size"):
        t.update(moe_shared_expert_intermediate_size=c["shared_expert_intermediate_size"],
                 moe_shared_expert_gate=True)
    return _args(c, "qwen2_moe", t)


def _qwen3_moe(c: dict) -> ModelArgs:
    t = _common(c)
    t.update(num_moe_experts=num_experts(c), moe_ffn_hidden_size=c["moe_intermediate_size"],
             qk_layernorm=True, moe_router_pre_softmax=not c.get("norm_topk_prob", True),
             moe_layer_freq=_moe_layer_pattern(c))
    return _args(c, "qwen3_moe", t)


def _deepseek_v3(c: dict) -> ModelArgs:
    t = _common(c)
    first_dense = c.get("first_k_dense_replace", 0)
    rope = c.get("rope_scaling") or {}
    t.update(
        num_query_groups=c["num_attention_heads"],
        # q_a_layernorm and kv_a_layernorm: megatron-core builds MLA's norms on the compressed
        # query and key/value only with qk_layernorm (transformer-engine fuses them into the up-projections)
        qk_layernorm=True,
        kv_channels=c["qk_nope_head_dim"] + c["qk_rope_head_dim"],
        num_moe_experts=c["n_routed_experts"], moe_ffn_hidden_size=c["moe_intermediate_size"],
        moe_layer_freq=[0] * first_dense + [1] * (c["num_hidden_layers"] - first_dense),
        moe_shared_expert_intermediate_size=(c.get("n_shared_experts") or 0) * c["moe_intermediate_size"] or None,
        moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
        moe_router_topk_scaling_factor=c.get("routed_scaling_factor", 1.0),
        moe_router_num_groups=c.get("n_group"), moe_router_group_topk=c.get("topk_group"),
        moe_router_load_balancing_type="seq_aux_loss", moe_aux_loss_coeff=c.get("aux_loss_alpha", 0.0),
        moe_router_pre_softmax=False,
        q_lora_rank=c.get("q_lora_rank"), kv_lora_rank=c["kv_lora_rank"],
        qk_head_dim=c["qk_nope_head_dim"], qk_pos_emb_head_dim=c["qk_rope_head_dim"], v_head_dim=c["v_head_dim"],
        rotary_base=float(c.get("rope_theta", 10000.0)),
    )
    if rope:
        if rope.get("type", rope.get("rope_type")) != "yarn":
            raise UnsupportedConfig(f"config.json: rope_scaling type {rope.get('type')!r} is not supported")
        t.update(rope_type="yarn", rotary_scaling_factor=rope["factor"], mscale=rope.get("mscale", 1.0),
                 mscale_all_dim=rope.get("mscale_all_dim", 0.0),
                 original_max_position_embeddings=rope["original_max_position_embeddings"],
                 beta_fast=rope.get("beta_fast", 32), beta_slow=rope.get("beta_slow", 1))
    else:
        t.update(rope_type="rope")
    if not c.get("norm_topk_prob", True):
        raise UnsupportedConfig("config.json: norm_topk_prob=false is not supported for deepseek_v3")
    if not c.get("rope_interleave", True):
        raise UnsupportedConfig("config.json: rope_interleave=false is not supported for deepseek_v3")
    if c.get("qk_head_dim", t["kv_channels"]) != t["kv_channels"]:
        raise UnsupportedConfig(f"config.json: qk_head_dim={c['qk_head_dim']} is not qk_nope_head_dim + qk_rope_head_dim")
    return _args(c, "deepseek_v3", t, mla=True, mtp_layers=c.get("num_nextn_predict_layers") or 0)


_FAMILIES = {
    "mixtral": (_COMMON_KEYS | {"num_local_experts"}, _mixtral),
    "qwen2_moe": (_COMMON_KEYS | {"num_experts", "num_local_experts", "qkv_bias", "moe_intermediate_size", "norm_topk_prob",
                                  "shared_expert_intermediate_size", "mlp_only_layers"}, _qwen2_moe),
    "qwen3_moe": (_COMMON_KEYS | {"num_experts", "num_local_experts", "moe_intermediate_size", "norm_topk_prob",
                                  "mlp_only_layers"}, _qwen3_moe),
    "deepseek_v3": (_COMMON_KEYS | {"n_routed_experts", "moe_intermediate_size", "n_shared_experts",
                                    "first_k_dense_replace", "routed_scaling_factor", "n_group", "topk_group",
                                    "aux_loss_alpha", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
                                    "qk_rope_head_dim", "v_head_dim", "norm_topk_prob",
                                    "num_nextn_predict_layers", "qk_head_dim", "rope_interleave"}, _deepseek_v3),
}
