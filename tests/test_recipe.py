"""Recipes and cluster profiles: bad input gets one clear line, exit 2, no traceback."""

import pytest

from launcher.errors import UserError
from launcher.recipe import load_recipe, time_limit_seconds
from tests.conftest import RECIPES


def write(tmp_path, text, name="r.yaml"):
    path = tmp_path / name
    path.write_text(text)
    (tmp_path / "m").mkdir(exist_ok=True)
    (tmp_path / "m" / "config.json").write_text((RECIPES / "models/tiny_moe/config.json").read_text())
    return path


def problems(fn):
    with pytest.raises(UserError) as info:
        fn()
    return info.value.problems


def test_shipped_recipes_load_and_resolve():
    for path in RECIPES.glob("*.yaml"):
        recipe = load_recipe(path)
        assert recipe.job.name == path.stem
        assert recipe.model.path.startswith("/")  # relative to the recipe file, made absolute
        assert recipe.megatron.expert_tensor_parallel_size is not None
        assert recipe.megatron.sequence_parallel == (recipe.megatron.tensor_model_parallel_size > 1)


def test_malformed_yaml_names_the_line(tmp_path):
    path = write(tmp_path, "model:\n  path: m\ndata:\n  max_length: [1, 2\n")
    (p,) = problems(lambda: load_recipe(path))
    assert p.startswith(f"{path}:5:") and "malformed YAML" in p


def test_unknown_key_names_line_and_closest_key(tmp_path):
    path = write(tmp_path, "model:\n  path: m\nmegatron:\n  expert_model_paralel_size: 2\n")
    (p,) = problems(lambda: load_recipe(path))
    assert p == (f"{path}:4: megatron.expert_model_paralel_size: unknown key "
                 "(did you mean 'expert_model_parallel_size'?)")


def test_wrong_types_are_all_reported(tmp_path):
    path = write(tmp_path, "model:\n  path: m\n  enable_gradient_checkpointing: yes please\n"
                           "trainer:\n  nnodes: two\ndata:\n  truncation: middle\n")
    found = problems(lambda: load_recipe(path))
    assert len(found) == 3
    assert any("model.enable_gradient_checkpointing: expected true or false, found 'yes please'" in p for p in found)
    assert any("trainer.nnodes: expected a whole number, found 'two'" in p for p in found)
    assert any("data.truncation: 'middle' is not one of error, left, right" in p for p in found)


def test_missing_required_and_duplicate_keys(tmp_path):
    path = write(tmp_path, "data:\n  max_length: 8\n  max_length: 9\n")
    found = problems(lambda: load_recipe(path))
    assert any("data.max_length: key given twice (first on line 2)" in p for p in found)
    path = write(tmp_path, "data:\n  max_length: 8\n")
    assert any("model: required key is missing" in p for p in problems(lambda: load_recipe(path)))


def test_overrides_are_yaml_scalars_and_checked(tmp_path):
    path = write(tmp_path, "model:\n  path: m\n")
    recipe = load_recipe(path, ["megatron.expert_model_parallel_size=4", "optim.lr=1e-5",
                                "model.enable_gradient_checkpointing=true", "job.time_limit=01:30:00"])
    assert recipe.megatron.expert_model_parallel_size == 4
    assert recipe.optim.lr == 1e-5  # PyYAML reads 1e-5 as a string; the schema makes it a number
    assert recipe.model.enable_gradient_checkpointing is True
    assert recipe.job.time_limit == "01:30:00"
    (p,) = problems(lambda: load_recipe(path, ["megatron.tensor_parallel=2"]))
    assert "megatron.tensor_parallel: unknown key" in p


def test_unquoted_time_limit_is_kept_as_a_time(tmp_path):
    # PyYAML reads 04:00:00 as the base-60 number 14400
    path = write(tmp_path, "model:\n  path: m\njob:\n  time_limit: 04:00:00\n")
    assert load_recipe(path).job.time_limit == "04:00:00"
    assert time_limit_seconds("2-00:00:00") == 172800
    assert time_limit_seconds("90") == 5400
    assert time_limit_seconds("01:02:03") == 3723


def test_job_names_are_sanitised(tmp_path):
    path = write(tmp_path, "model:\n  path: m\njob:\n  name: \"my job; rm -rf /\"\n")
    assert load_recipe(path).job.name == "my-job-rm-rf"


def test_env_values_must_be_plain(tmp_path):
    path = write(tmp_path, "model:\n  path: m\njob:\n  env:\n    NCCL_DEBUG: INFO\n    FLAG: true\n    N: 4\n")
    (p,) = problems(lambda: load_recipe(path))
    assert "job.env.FLAG: true (a boolean) is not a plain value; quote it" in p


def test_param_offload_is_refused_before_the_job_queues():
    found = problems(lambda: load_recipe(RECIPES / "tiny_moe.yaml", ["megatron.param_offload=true"]))
    assert len(found) == 1 and "megatron.param_offload: true is not supported" in found[0]
    assert "optimizer_offload" in found[0] and "grad_offload" in found[0]


def test_chat_template_options_are_a_mapping(tmp_path):
    path = write(tmp_path, "model:\n  path: m\ndata:\n  apply_chat_template_kwargs:\n    enable_thinking: false\n")
    assert load_recipe(path).data.apply_chat_template_kwargs == {"enable_thinking": False}
    path = write(tmp_path, "model:\n  path: m\ndata:\n  apply_chat_template_kwargs: [enable_thinking]\n")
    (p,) = problems(lambda: load_recipe(path))
    assert "r.yaml:4: data.apply_chat_template_kwargs: ['enable_thinking'] is not a mapping" in p


def test_padding_experts_to_capacity_needs_a_capacity_as_megatron_core_says():
    moe = "model.override_config.moe_config"
    (p,) = problems(lambda: load_recipe(RECIPES / "tiny_moe.yaml", [f"{moe}.pad_to_capacity=true"]))
    assert f"{moe}.pad_to_capacity: true needs a capacity_factor" in p
    (p,) = problems(lambda: load_recipe(RECIPES / "tiny_moe.yaml", [f"{moe}.capacity_factor=0"]))
    assert f"{moe}.capacity_factor: 0.0 must be above 0" in p and "null for dropless" in p
    padded = load_recipe(RECIPES / "tiny_moe.yaml", [f"{moe}.pad_to_capacity=true", f"{moe}.capacity_factor=1.25"])
    assert padded.model.override_config.moe_config.pad_to_capacity
    transformer_config = pytest.importorskip("megatron.core.transformer.transformer_config")
    with pytest.raises(ValueError, match="capacity_factor must be set"):
        transformer_config.TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_moe_experts=4,
                                             moe_router_topk=2, moe_pad_expert_input_to_capacity=True)
