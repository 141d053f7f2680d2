"""The memory model: parameter accounting, optimizer sharding and offload, recompute."""

import json

import pytest

from launcher.cluster import load_cluster
from launcher.plan.check import make_plan
from launcher.plan.layout import plan_layout
from launcher.plan.memory import GIB, stage_params
from launcher.plan.models import read_model
from launcher.recipe import load_recipe
from tests.conftest import RECIPES, run_launcher


def plan(name, cluster="slurm", *overrides):
    recipe = load_recipe(RECIPES / f"{name}.yaml", list(overrides))
    return make_plan(recipe, load_cluster(cluster), read_model(recipe.model.path))


@pytest.mark.parametrize("name,billions", [("deepseek_v3", 671.0), ("qwen3_235b_a22b", 235.1),
                                          ("mixtral_8x7b", 46.7), ("qwen2_moe", 14.3)])
def test_parameter_counts_match_the_published_sizes(name, billions):
    recipe = load_recipe(RECIPES / f"{name}.yaml")
    assert read_model(recipe.model.path).total_params() / 1e9 == pytest.approx(billions, rel=0.002)


@pytest.mark.parametrize("name", ["deepseek_v3", "qwen3_235b_a22b", "mixtral_8x7b", "qwen2_moe"])
def test_every_parameter_lives_on_some_gpu(name):
    recipe = load_recipe(RECIPES / f"{name}.yaml")
    model = read_model(recipe.model.path)
    lay = plan_layout(recipe, model)
    stages = [stage_params(model, lay, s) for s in range(lay.pp)]
    experts = sum(e for _, e in stages) * lay.ep * lay.etp
    assert experts == model.num_moe_layers * model.num_experts * model.expert_params()
    dense = sum(d for d, _ in stages) * lay.tp
    # replicated norms and routers count once per TP rank, and the vocabulary is padded
    assert dense == pytest.approx(model.total_params() - experts, rel=0.02)


def test_optimizer_is_sharded_over_data_parallel_ranks_and_offloaded():
    sharded = plan("qwen2_moe").memory
    whole = plan("qwen2_moe", "slurm", "megatron.use_distributed_optimizer=false").memory
    assert whole.optimizer > 2.5 * sharded.optimizer  # dense over DP=8, experts over EDP=2
    offloaded = plan("qwen2_moe", "slurm", "megatron.optimizer_offload=true").memory
    assert offloaded.optimizer == 0 and offloaded.optimizer_on_host == pytest.approx(sharded.optimizer)
    assert offloaded.params == sharded.params and offloaded.grads == sharded.grads


def test_weights_bf16_grads_fp32():
    mem = plan("mixtral_8x7b").memory
    assert mem.grads == pytest.approx(2 * mem.params)


def test_recompute_shrinks_activations():
    full = plan("qwen2_moe").memory
    recompute = plan("qwen2_moe", "slurm", "model.enable_gradient_checkpointing=true").memory
    assert recompute.activations < full.activations / 3  # the logits stay
    longer = plan("qwen2_moe", "slurm", "data.max_length=8192").memory
    # the layers' activations double; the chunked output loss's buffers do not grow
    assert 1.75 * full.activations < longer.activations < 2 * full.activations


def test_the_busiest_expert_rank_is_counted_as_routing_or_capacity_allows():
    """Dropless routing under EP leaves the busiest rank's load to the router (a headroom above
    the even share); a capacity factor caps it; padding to capacity fixes it; a router forced to
    balance spreads it evenly."""
    moe = "model.override_config.moe_config"
    dropless = plan("qwen2_moe").memory  # EP 4
    capped = plan("qwen2_moe", "slurm", f"{moe}.capacity_factor=1.1").memory
    full = plan("qwen2_moe", "slurm", f"{moe}.capacity_factor=1.0", f"{moe}.pad_to_capacity=true").memory
    padded = plan("qwen2_moe", "slurm", f"{moe}.capacity_factor=1.5", f"{moe}.pad_to_capacity=true").memory
    assert full.activations < capped.activations < dropless.activations < padded.activations
    assert padded.params == dropless.params
    forced = plan("qwen2_moe", "slurm", f"{moe}.force_load_balancing=true").memory
    assert forced.activations == pytest.approx(full.activations)
    # one EP rank holds every expert: exactly the even share, as padded to capacity 1.0 holds
    one_rank = ["megatron.expert_model_parallel_size=1"]
    assert plan("qwen2_moe", "slurm", *one_rank).memory.activations == pytest.approx(
        plan("qwen2_moe", "slurm", *one_rank, f"{moe}.capacity_factor=1.0", f"{moe}.pad_to_capacity=true"
             ).memory.activations)


def test_the_all_gather_dispatcher_counts_every_ranks_tokens_once():
    """The all-gather dispatcher holds its group's tokens and their partial sums (bf16) for one
    layer, padded to capacity or not."""
    moe = "model.override_config.moe_config"
    padded = [f"{moe}.capacity_factor=1.0", f"{moe}.pad_to_capacity=true"]
    gather = f"{moe}.token_dispatcher=allgather"
    recipe = load_recipe(RECIPES / "qwen2_moe.yaml")
    model = read_model(recipe.model.path)
    layout = plan_layout(recipe, model, 8)
    rows = layout.ep * layout.etp * recipe.data.max_length * recipe.data.micro_batch_size / layout.cp / (
        layout.tp if layout.sequence_parallel else 1)
    extra = plan("qwen2_moe", "slurm", *padded, gather).memory.activations - plan("qwen2_moe", "slurm", *padded
                                                                                   ).memory.activations
    assert extra * GIB == pytest.approx(rows * model.hidden * 4)
    dropless = plan("qwen2_moe", "slurm", gather).memory.activations - plan("qwen2_moe").memory.activations
    assert dropless * GIB == pytest.approx(rows * model.hidden * 4)


def test_deepseek_fits_on_h200_not_on_h100(tmp_path):
    rc, out, err = run_launcher("validate", RECIPES / "deepseek_v3.yaml", "--cluster", "slurm")
    assert rc == 2 and "but cluster 'slurm' has 80.0 GiB" in err and "Traceback" not in err
    rc, out, err = run_launcher("validate", RECIPES / "deepseek_v3.yaml", "--cluster", "slurm-h200")
    assert rc == 0 and out.startswith("ok: ")
    rc, out, err = run_launcher("plan", RECIPES / "deepseek_v3.yaml", "--cluster", "slurm", "--json")
    result = json.loads(out)
    assert rc == 0 and result["fits"] is False
    for key in "world_size tp pp ep etp cp dp edp memory_gib fits".split():
        assert key in result
    for key in "params grads optimizer activations total".split():
        assert key in result["memory_gib"]
    assert result["memory_gib"]["total"] > 80


def test_multi_token_prediction_layer_is_counted_on_the_last_stage():
    recipe = load_recipe(RECIPES / "deepseek_v3.yaml")
    model = read_model(recipe.model.path)
    assert model.mtp_layers == 1
    lay = plan_layout(recipe, model)
    last = lay.pp - 1
    dense, expert = stage_params(model, lay, last)
    dense_mtp, expert_mtp = stage_params(model, lay, last, mtp=1)
    assert (expert_mtp - expert) * lay.ep * lay.etp == model.num_experts * model.expert_params()
    assert (dense_mtp - dense) * lay.tp > 2 * model.hidden * model.hidden  # attention, norms, eh_proj
    assert stage_params(model, lay, 0, mtp=1) == stage_params(model, lay, 0)


def test_bf16_gradient_buffers_halve_the_gradient_memory():
    fp32 = plan("mixtral_8x7b", "slurm").memory
    bf16 = plan("mixtral_8x7b", "slurm", "megatron.grad_reduce_in_fp32=false").memory
    assert bf16.grads == pytest.approx(fp32.grads / 2)
    assert bf16.params == fp32.params and bf16.optimizer == fp32.optimizer
    assert bf16.total == pytest.approx(fp32.total - fp32.grads / 2)
