"""Model dimensions from a Hugging Face config.json, for the four MoE families (no torch).

`ModelDims` holds what the layout rules and the memory model need: sizes, head counts,
which layers are MoE, and parameter counts split into the parts that shard differently
(tensor-parallel dense weights, replicated norms and routers, expert weights).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from launcher.errors import UserError

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3")


@dataclass(frozen=True)
class ModelDims:
    family: str
    num_layers: int
    hidden: int
    vocab: int
    num_heads: int
    num_kv_heads: int  # query groups; MLA models have one key/value per head
    head_dim: int
    dense_ffn: int  # intermediate size of the dense MLP layers
    moe_ffn: int  # intermediate size of one routed expert
    num_experts: int
    topk: int
    shared_ffn: int  # total intermediate size of the shared expert(s); 0 when none
    moe_layers: tuple[int, ...]  # indices of the layers whose MLP is MoE
    tied_embeddings: bool
    qkv_bias: bool = False
    qk_norm: bool = False
    # Multi-latent attention (DeepSeek-V3); None elsewhere.
    q_lora_rank: Optional[int] = None
    kv_lora_rank: Optional[int] = None
    qk_nope_dim: int = 0
    qk_rope_dim: int = 0
    v_head_dim: int = 0
    num_groups: int = 1  # group-limited routing: experts fall into this many groups
    mtp_layers: int = 0  # DeepSeek-V3's multi-token-prediction layers (held when model.enable_mtp)
    topk_groups: int = 1

    @property
    def mla(self) -> bool:
        return self.kv_lora_rank is not None

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layers)

    # Parameter counts per layer part. "tp" parts are split by tensor parallelism,
    # "rep" parts are replicated on every tensor-parallel rank.
    def attention_params(self) -> tuple[int, int]:
        h = self.hidden
        if self.mla:
            q_head = self.qk_nope_dim + self.qk_rope_dim
            if self.q_lora_rank:
                q = h * self.q_lora_rank + self.q_lora_rank * self.num_heads * q_head
                q_norm = self.q_lora_rank
            else:
                q, q_norm = h * self.num_heads * q_head, 0
            # The down-projections (q_a, kv_a) are replicated over TP in megatron-core's MLA.
            kv_down = h * (self.kv_lora_rank + self.qk_rope_dim)
            kv_up = self.kv_lora_rank * self.num_heads * (self.qk_nope_dim + self.v_head_dim)
            out = self.num_heads * self.v_head_dim * h
            tp = (q - (h * self.q_lora_rank if self.q_lora_rank else 0)) + kv_up + out
            rep = (h * self.q_lora_rank if self.q_lora_rank else 0) + kv_down + q_norm + self.kv_lora_rank + h
            return tp, rep
        q = h * self.num_heads * self.head_dim
        kv = 2 * h * self.num_kv_heads * self.head_dim
        out = self.num_heads * self.head_dim * h
        bias = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim if self.qkv_bias else 0
        norms = h + (2 * self.head_dim if self.qk_norm else 0)
        return q + kv + out + bias, norms

    def dense_mlp_params(self) -> int:
        return 3 * self.hidden * self.dense_ffn  # SwiGLU: gate, up, down

    def expert_params(self) -> int:
        return 3 * self.hidden * self.moe_ffn  # one routed expert

    def moe_replicated_params(self) -> int:
        """Router (and DeepSeek's expert bias, Qwen2's shared-expert gate) and the MLP norm."""
        extra = self.num_experts if self.family == "deepseek_v3" else 0
        gate = self.hidden if self.family == "qwen2_moe" and self.shared_ffn else 0
        return self.num_experts * self.hidden + extra + gate + self.hidden

    def shared_expert_params(self) -> int:
        return 3 * self.hidden * self.shared_ffn

    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    def total_params(self) -> int:
        attn = sum(self.attention_params()) * self.num_layers
        dense_layers = self.num_layers - self.num_moe_layers
        mlp = dense_layers * (self.dense_mlp_params() + self.hidden)
        moe = self.num_moe_layers * (self.num_experts * self.expert_params()
                                     + self.shared_expert_params() + self.moe_replicated_params())
        emb = self.embedding_params() * (1 if self.tied_embeddings else 2) + self.hidden
        return attn + mlp + moe + emb

    def active_params(self) -> int:
        inactive = self.num_moe_layers * (self.num_experts - self.topk) * self.expert_params()
        return self.total_params() - inactive


def read_model(model_path: str, recipe_file: Path | str = "recipe") -> ModelDims:
    """Dimensions of the model whose config.json is in folder `model_path`."""
    path = Path(model_path)
    config_file = path if path.name == "config.json" else path / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except FileNotFoundError:
        raise UserError(f"{recipe_file}: model.path: no config.json at {config_file}; "
                        "point model.path at a Hugging Face model folder") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{config_file}:{err.lineno}: not valid JSON: {err.msg}") from None
    return dims_from_config(config, config_file)


def dims_from_config(config: dict, source: Path | str = "config.json") -> ModelDims:
    family = config.get("model_type")
    if family not in FAMILIES:
        raise UserError(f"{source}: model_type: '{family}' is not supported; "
                        f"supported MoE families: {', '.join(FAMILIES)}")
    try:
        return _READERS[family](config)
    except KeyError as err:
        raise UserError(f"{source}: {err.args[0]}: required for model_type {family} but missing") from None


def _common(c: dict) -> dict:
    heads = c["num_attention_heads"]
    return dict(
        num_layers=c["num_hidden_layers"], hidden=c["hidden_size"], vocab=c["vocab_size"],
        num_heads=heads, num_kv_heads=c.get("num_key_value_heads") or heads,
        head_dim=c.get("head_dim") or c["hidden_size"] // heads,
        topk=c["num_experts_per_tok"], tied_embeddings=bool(c.get("tie_word_embeddings", False)),
    )


def _qwen_experts(c: dict) -> int:
    return c.get("num_experts") or c["num_local_experts"]  # transformers 5 writes the latter


def _qwen_moe_layers(c: dict) -> tuple[int, ...]:
    step = c.get("decoder_sparse_step", 1) or 1
    dense = set(c.get("mlp_only_layers") or [])
    return tuple(i for i in range(c["num_hidden_layers"])
                 if i not in dense and _qwen_experts(c) > 0 and (i + 1) % step == 0)


def _mixtral(c: dict) -> ModelDims:
    return ModelDims(family="mixtral", dense_ffn=c["intermediate_size"], moe_ffn=c["intermediate_size"],
                     num_experts=c["num_local_experts"], shared_ffn=0,
                     moe_layers=tuple(range(c["num_hidden_layers"])), **_common(c))


def _qwen2_moe(c: dict) -> ModelDims:
    return ModelDims(family="qwen2_moe", dense_ffn=c["intermediate_size"], moe_ffn=c["moe_intermediate_size"],
                     num_experts=_qwen_experts(c), shared_ffn=c.get("shared_expert_intermediate_size", 0),
                     moe_layers=_qwen_moe_layers(c), qkv_bias=True, **_common(c))


def _qwen3_moe(c: dict) -> ModelDims:
    return ModelDims(family="qwen3_moe", dense_ffn=c["intermediate_size"], moe_ffn=c["moe_intermediate_size"],
                     num_experts=_qwen_experts(c), shared_ffn=0, moe_layers=_qwen_moe_layers(c),
                     qkv_bias=bool(c.get("attention_bias", False)), qk_norm=True, **_common(c))


def _deepseek_v3(c: dict) -> ModelDims:
    freq = c.get("moe_layer_freq", 1) or 1
    first_dense = c.get("first_k_dense_replace", 0)
    moe_layers = tuple(i for i in range(c["num_hidden_layers"]) if i >= first_dense and i % freq == 0)
    common = _common(c)
    common["num_kv_heads"] = common["num_heads"]
    common["head_dim"] = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    return ModelDims(family="deepseek_v3", dense_ffn=c["intermediate_size"], moe_ffn=c["moe_intermediate_size"],
                     num_experts=c["n_routed_experts"],
                     shared_ffn=(c.get("n_shared_experts") or 0) * c["moe_intermediate_size"],
                     moe_layers=moe_layers, q_lora_rank=c.get("q_lora_rank"), kv_lora_rank=c["kv_lora_rank"],
                     qk_nope_dim=c["qk_nope_head_dim"], qk_rope_dim=c["qk_rope_head_dim"],
                     v_head_dim=c["v_head_dim"], num_groups=c.get("n_group") or 1,
                     topk_groups=c.get("topk_group") or 1, mtp_layers=c.get("num_nextn_predict_layers") or 0,
                     **common)


_READERS = {"mixtral": _mixtral, "qwen2_moe": _qwen2_moe, "qwen3_moe": _qwen3_moe, "deepseek_v3": _deepseek_v3}
