"""LoRA adapters as the planner counts them: which linear layers of a model get one, and how many
adapter parameters each GPU holds.

An adapter on a linear layer W (in -> out) is A (rank x in) and B (out x rank); its output,
scaled by alpha / rank, adds to W's. It is split like W: under a column-parallel W (output
split over TP) B is split and A is whole on every TP rank; under a row-parallel W (input split)
A is split and B whole. MLA's down-projections are whole on every rank, as their weights are.
Routed experts have one pair per expert (living with its expert, so split by EP) or one pair
that all experts share (`expert_adapters: shared`, an ordinary replicated weight).
"""

from __future__ import annotations

from launcher.plan.models import ModelDims
from launcher.recipe import LoraSection


def linear_shapes(model: ModelDims, moe: bool) -> dict[str, list[tuple[int, int, str]]]:
    """(in, out, how it is split) of each adaptable linear layer of one layer of the model, by name;
    a name may cover several layers (an MoE layer's linear_fc1 is its shared expert's and its
    routed experts')."""
    h = model.hidden
    shapes: dict[str, list[tuple[int, int, str]]] = {}
    if model.mla:
        q_head = model.qk_nope_dim + model.qk_rope_dim
        if model.q_lora_rank:
            shapes["linear_q_down_proj"] = [(h, model.q_lora_rank, "whole")]
            shapes["linear_q_up_proj"] = [(model.q_lora_rank, model.num_heads * q_head, "column")]
        else:
            shapes["linear_q_proj"] = [(h, model.num_heads * q_head, "column")]
        shapes["linear_kv_down_proj"] = [(h, model.kv_lora_rank + model.qk_rope_dim, "whole")]
        shapes["linear_kv_up_proj"] = [(model.kv_lora_rank,
                                        model.num_heads * (model.qk_nope_dim + model.v_head_dim), "column")]
        shapes["linear_proj"] = [(model.num_heads * model.v_head_dim, h, "row")]
    else:
        shapes["linear_qkv"] = [(h, (model.num_heads + 2 * model.num_kv_heads) * model.head_dim, "column")]
        shapes["linear_proj"] = [(model.num_heads * model.head_dim, h, "row")]
    if not moe:
        shapes["linear_fc1"] = [(h, 2 * model.dense_ffn, "column")]
        shapes["linear_fc2"] = [(model.dense_ffn, h, "row")]
        return shapes
    shapes["linear_fc1"] = [(h, 2 * model.moe_ffn, "expert")]
    shapes["linear_fc2"] = [(model.moe_ffn, h, "expert")]
    if model.shared_ffn:
        shapes["linear_fc1"].append((h, 2 * model.shared_ffn, "column"))
        shapes["linear_fc2"].append((model.shared_ffn, h, "row"))
    shapes["router"] = [(h, model.num_experts, "whole")]
    return shapes


def adapted(model: ModelDims, lora: LoraSection) -> set[str]:
    """The names the recipe targets that the model has."""
    present = set(linear_shapes(model, moe=False)) | set(linear_shapes(model, moe=True))
    return lora.targets() & present


def layer_adapter_params(model: ModelDims, lora: LoraSection, moe: bool, tp: int, ep: int,
                         etp: int = 1) -> tuple[float, float]:
    """(dense, expert) adapter parameters one GPU holds for one layer. Under ETP > 1 the
    experts' adapters split like their weights: fc1's B by rows, fc2's A by columns."""
    r = lora.rank
    dense = expert = 0.0
    targets = lora.targets()
    for name, shapes in linear_shapes(model, moe).items():
        if name not in targets:
            continue
        for n_in, n_out, split in shapes:
            if split == "column":
                dense += r * n_in + r * n_out / tp
            elif split == "row":
                dense += r * n_in / tp + r * n_out
            elif split == "whole":
                dense += r * (n_in + n_out)
            else:
                pair = r * n_in + r * n_out / etp if name == "linear_fc1" else r * n_in / etp + r * n_out
                if lora.expert_adapters == "shared":
                    dense += pair
                else:
                    expert += model.num_experts / ep * pair
    return dense, expert


def layer_adapter_activations(model: ModelDims, lora: LoraSection, moe: bool, tokens: float, routed: float) -> float:
    """Bytes the adapter branches of one layer keep for backward: each keeps its rank-sized
    middle (bf16), and with dropout the dropped copy of its input."""
    total = 0.0
    for name, shapes in linear_shapes(model, moe).items():
        if name not in lora.targets():
            continue
        for n_in, _, split in shapes:
            rows = routed if split == "expert" else tokens
            total += 2 * rows * lora.rank + (2 * rows * n_in if lora.dropout else 0)
    return total


def adapts_experts(model: ModelDims, lora: LoraSection) -> bool:
    """Whether the recipe puts adapters on the routed experts (they need ETP = 1 or TP)."""
    return lora.enabled and model.num_experts > 0 and bool(adapted(model, lora) & {"linear_fc1", "linear_fc2"})
