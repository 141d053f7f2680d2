"""The planner's megatron-core rules, on the seed README's layouts and against megatron-core itself."""

import pytest

from launcher.errors import UserError
from launcher.plan.layout import plan_layout, uneven_split
from launcher.plan.models import read_model
from launcher.recipe import load_recipe
from tests.conftest import RECIPES


def layout(recipe_name, *overrides):
    recipe = load_recipe(RECIPES / f"{recipe_name}.yaml", list(overrides))
    return plan_layout(recipe, read_model(recipe.model.path), gpus_per_node=8), recipe


def errors(recipe_name, *overrides):
    with pytest.raises(UserError) as info:
        layout(recipe_name, *overrides)
    return info.value.problems


def test_seed_mixtral_layout_is_valid_with_sequence_parallelism():
    lay, _ = layout("mixtral_8x7b")
    assert (lay.world_size, lay.tp, lay.pp, lay.ep, lay.etp, lay.dp, lay.edp) == (16, 2, 2, 4, 2, 4, 1)
    assert lay.sequence_parallel and lay.stage_layers == (16, 16)
    assert lay.tp * lay.cp * lay.dp * lay.pp == lay.world_size == lay.etp * lay.ep * lay.edp * lay.pp


def test_seed_qwen3_layout_needs_etp_1():
    # The seed's TP=4 PP=8 EP=4 on 32 GPUs: ETP defaults to TP, so experts need 4 x 4 x 8 = 128 GPUs.
    (p,) = errors("qwen3_235b_a22b", "megatron.expert_tensor_parallel_size=null")
    assert "= 4 x 4 x 8 = 128" in p and "try megatron.expert_tensor_parallel_size=1" in p
    lay, recipe = layout("qwen3_235b_a22b")
    assert (lay.dp, lay.edp, lay.etp) == (1, 1, 1)
    assert lay.stage_layers == (11, 12, 12, 12, 12, 12, 12, 11) and sum(lay.stage_layers) == 94
    assert recipe.megatron.num_layers_in_first_pipeline_stage == 11


def test_seed_deepseek_layout_is_rejected_with_a_valid_ep():
    # The seed's EP=32 PP=16 on 64 GPUs: EP x PP = 512 > 64.
    found = errors("deepseek_v3", "megatron.expert_model_parallel_size=32", "megatron.pipeline_model_parallel_size=16")
    assert any("= 1 x 32 x 16 = 512" in p and "try megatron.expert_model_parallel_size=4" in p for p in found)
    lay, _ = layout("deepseek_v3")
    assert lay.stage_layers == (7, 8, 8, 8, 8, 8, 8, 6) and sum(lay.stage_layers) == 61


def test_experts_must_divide_by_ep():
    (p,) = errors("qwen2_moe", "megatron.expert_model_parallel_size=8")
    assert p == ("megatron.expert_model_parallel_size=8 does not divide the model's 60 experts; "
                 "try megatron.expert_model_parallel_size=4")


def test_tp_must_divide_heads_and_query_groups():
    found = errors("mixtral_8x7b", "megatron.tensor_model_parallel_size=6", "megatron.expert_tensor_parallel_size=1",
                   "trainer.nnodes=3", "data.max_length=4104")
    assert any("tensor_model_parallel_size=6 must divide the model's 32 attention heads and be a multiple or "
               "divisor of its 8 query groups; try megatron.tensor_model_parallel_size=4" in p for p in found)


def test_moe_with_tp_needs_sequence_parallelism():
    found = errors("mixtral_8x7b", "megatron.sequence_parallel=false")
    assert any("sequence_parallel=false with megatron.tensor_model_parallel_size=2" in p for p in found)


def test_sequence_length_and_batch_rules():
    found = errors("mixtral_8x7b", "megatron.context_parallel_size=2", "megatron.pipeline_model_parallel_size=1",
                   "data.max_length=4100", "data.global_batch_size=100")
    assert any("data.max_length=4100 must be a multiple of 8" in p and "try data.max_length=4104" in p for p in found)
    assert any("data.global_batch_size=100 is not a multiple of data.micro_batch_size x DP = 1 x 4 = 4" in p
               for p in found) is False  # 100 is a multiple of 4: only the length is wrong
    found = errors("mixtral_8x7b", "data.global_batch_size=30")
    assert found == ["data.global_batch_size=30 is not a multiple of data.micro_batch_size x DP = 1 x 4 = 4; "
                     "try data.global_batch_size=32"]


def test_world_size_rules_name_both_foldings():
    found = errors("mixtral_8x7b", "trainer.nnodes=3", "trainer.n_gpus_per_node=4")
    assert any("3 x 4 = 12 GPUs, not a multiple of megatron.expert_tensor_parallel_size x "
               "expert_model_parallel_size x pipeline_model_parallel_size = 2 x 4 x 2 = 16" in p for p in found)


def test_pipeline_bubble_and_cross_node_warnings():
    lay, _ = layout("mixtral_8x7b", "data.global_batch_size=4")
    assert any("micro-batches per step with PP=2" in w for w in lay.warnings)
    lay, _ = layout("mixtral_8x7b", "megatron.expert_model_parallel_size=8", "megatron.expert_tensor_parallel_size=1",
                    "megatron.pipeline_model_parallel_size=1")
    assert lay.warnings == ()
    lay, _ = layout("qwen3_235b_a22b", "megatron.expert_model_parallel_size=16", "megatron.pipeline_model_parallel_size=2",
                    "megatron.tensor_model_parallel_size=1", "megatron.sequence_parallel=false")
    assert any("ETP x EP = 16 spans nodes" in w for w in lay.warnings)


# megatron-core's own TransformerConfig checks the pipeline split and the head counts.
megatron = pytest.importorskip("megatron.core.transformer.transformer_config")


@pytest.mark.parametrize("layers", [5, 7, 9, 27, 61, 94])
@pytest.mark.parametrize("pp", [2, 3, 4, 8])
def test_uneven_split_is_accepted_by_megatron_core(layers, pp):
    import torch

    if layers % pp == 0 or pp > layers:
        return
    first, last = uneven_split(layers, pp)
    assert first is not None
    megatron.TransformerConfig(num_layers=layers, hidden_size=64, num_attention_heads=8,
                               pipeline_model_parallel_size=pp, pipeline_dtype=torch.bfloat16,
                               num_layers_in_first_pipeline_stage=first, num_layers_in_last_pipeline_stage=last)


@pytest.mark.parametrize("tp", [1, 2, 3, 4, 8, 16])
def test_head_rule_agrees_with_megatron_core(tp):
    recipe = load_recipe(RECIPES / "qwen3_235b_a22b.yaml",
                         [f"megatron.tensor_model_parallel_size={tp}", "megatron.expert_tensor_parallel_size=1",
                          "megatron.pipeline_model_parallel_size=1", "trainer.nnodes=6",
                          "megatron.expert_model_parallel_size=1", "data.max_length=4128",
                          "data.global_batch_size=192"])
    model = read_model(recipe.model.path)
    try:
        plan_layout(recipe, model)
        ours = True
    except UserError:
        ours = False
    try:
        megatron.TransformerConfig(num_layers=2, hidden_size=model.hidden, num_attention_heads=model.num_heads,
                                   num_query_groups=model.num_kv_heads, tensor_model_parallel_size=tp,
                                   sequence_parallel=tp > 1)
        theirs = True
    except (ValueError, AssertionError):
        theirs = False
    assert ours == theirs


@pytest.mark.parametrize("overrides", [
    [],  # the recipe's PP=2 without virtual stages
    ["megatron.virtual_pipeline_model_parallel_size=2", "data.global_batch_size=128"],
    ["megatron.pipeline_model_parallel_size=1"],
    ["megatron.pipeline_model_parallel_size=1", "megatron.expert_model_parallel_size=1",
     "megatron.expert_tensor_parallel_size=1"],
    ["megatron.pipeline_model_parallel_size=1", "model.override_config.moe_config.token_dispatcher=allgather"],
    ["megatron.pipeline_model_parallel_size=1", "model.enable_gradient_checkpointing=true"],
])
def test_a2a_overlap_rules_agree_with_megatron_core(overrides):
    """megatron.overlap_moe_expert_parallel_comm is refused before queueing exactly where
    megatron-core's TransformerConfig would refuse it inside the job."""
    import torch

    base = ["megatron.overlap_moe_expert_parallel_comm=true", "model.enable_gradient_checkpointing=false"]
    try:
        _, recipe = layout("mixtral_8x7b", *base, *overrides)
        ours = True
    except UserError as error:
        assert all("overlap_moe_expert_parallel_comm=true" in p for p in error.problems)
        recipe = load_recipe(RECIPES / "mixtral_8x7b.yaml", [*base, *overrides])
        ours = False
    meg, moe = recipe.megatron, recipe.model.override_config.moe_config
    recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    try:
        megatron.TransformerConfig(
            num_layers=8, hidden_size=64, num_attention_heads=8, num_moe_experts=8, moe_router_topk=2,
            bf16=True, pipeline_dtype=torch.bfloat16, pipeline_model_parallel_size=meg.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=meg.virtual_pipeline_model_parallel_size,
            expert_model_parallel_size=meg.expert_model_parallel_size, moe_token_dispatcher_type=moe.token_dispatcher,
            overlap_moe_expert_parallel_comm=True, **(recompute if recipe.model.enable_gradient_checkpointing else {}))
        theirs = True
    except (ValueError, AssertionError):
        theirs = False
    assert ours == theirs
