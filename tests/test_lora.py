"""LoRA (model.lora): adapters on a frozen base, the same run under every layout, checkpoints of
adapters only, merged export that transformers loads, and the planner's count of it all.

The layout runs switch the load-balancing loss off: megatron-core weighs each rank's balance loss
by the tokens it routes, so under sequence parallelism its gradient shrinks by the TP size
against one GPU (README, transformer-engine section); that is the base trainer's, not LoRA's."""

import re
from pathlib import Path

import pytest

from tests.conftest import REPO, run_launcher
from tests.hf_models import FAMILIES, read_all, save_tiny_model
from tests.trainer_helpers import losses, plain_tensors, train

pytest.importorskip("megatron.core")

QUIET = ["data.val_files=[]", "trainer.test_freq=0", "trainer.save_freq=0"]


@pytest.fixture(scope="module")
def base(init_checkpoint):
    """The base checkpoint: the tiny model's initial weights (conftest)."""
    return init_checkpoint


def lora_run(run_dir, base, *overrides, nproc=2, steps=3):
    return train(run_dir, f"megatron.dist_checkpointing_path={base}", "model.lora.rank=8", "optim.lr=3e-3",
                 "optim.lr_warmup_steps_ratio=0", f"trainer.total_training_steps={steps}", *QUIET, *overrides,
                 nproc=nproc)


def test_lora_trains_only_adapters_from_the_base_and_is_the_same_under_every_layout(base, tmp_path):
    """Step 0 is the base model; the adapted model's loss falls below the base's on the same
    batches; DDP and the optimizer hold the adapters only, as many as the planner counts; the
    checkpoint holds only adapters. EP=1, EP=2, TP=2 with ETP=1 and with ETP=2 (sequence
    parallel) and PP=2 give the same losses and gradient norms, per-expert and shared expert
    adapters; a checkpoint saved under EP=2 resumes under EP=1, one saved under TP=2/ETP=2 too."""
    from launcher.plan.layout import plan_layout
    from launcher.plan.memory import stage_adapter_params, stage_params
    from launcher.plan.models import read_model
    from launcher.recipe import load_recipe

    import hashlib

    def digests(folder):
        return {f: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(Path(folder).rglob("*")) if f.is_file()}

    base_files = digests(base)
    common = ["model.override_config.moe_config.aux_loss_coeff=0",
              "model.lora.target_modules=[all-linear,router]", "megatron.expert_model_parallel_size=1"]
    # the base model itself on the same batches: no adapters, weights that never change
    _, _, frozen = train(tmp_path / "base-lr0", f"megatron.dist_checkpointing_path={base}", "optim.lr=0",
                         "optim.min_lr=0", "trainer.total_training_steps=3", *common[:1], common[2], *QUIET)
    layouts = {"ep1": [], "ep2": ["megatron.expert_model_parallel_size=2", "trainer.save_freq=2"],
               "tp2": ["megatron.tensor_model_parallel_size=2", "megatron.expert_tensor_parallel_size=1"],
               "tp2_etp2": ["megatron.tensor_model_parallel_size=2", "megatron.expert_tensor_parallel_size=2",
                            "trainer.save_freq=2"],
               "pp2": ["megatron.pipeline_model_parallel_size=2"]}
    found, logs = {}, {}
    for name, overrides in layouts.items():
        _, logs[name], found[name] = lora_run(tmp_path / name, base, *common, *overrides)
    for name in ("ep2", "tp2_etp2"):
        found[f"shared-{name}"] = lora_run(tmp_path / f"shared-{name}", base, *common, *layouts[name],
                                           "model.lora.expert_adapters=shared")[2]

    assert digests(base) == base_files  # the base checkpoint every run read is bit-identical afterwards
    # B starts at zero: the first loss is the base model's; then the adapters learn
    assert losses(found["ep1"])[0] == losses(frozen)[0]
    assert all(a < b for a, b in zip(losses(found["ep1"])[1:], losses(frozen)[1:])), (found["ep1"], frozen)

    def same(a, b):
        for key in ("loss", "grad_norm"):
            for x, y in zip([m[key] for m in a if "loss" in m], [m[key] for m in b if "loss" in m]):
                assert abs(x - y) <= 1e-5 * abs(y), (key, x, y)

    for name in ("ep2", "tp2", "tp2_etp2", "pp2"):
        same(found[name], found["ep1"])
    same(found["shared-tp2_etp2"], found["shared-ep2"])
    assert losses(found["shared-ep2"])[1] != losses(found["ep1"])[1]  # a shared pair is another model

    for saved in ("ep2", "tp2_etp2"):
        _, log, resumed = lora_run(tmp_path / f"resumed-{saved}", base, *common,
                                   f"trainer.resume_from_path={tmp_path / saved / 'checkpoints' / 'step_000002'}")
        assert "resumed from" in log and len(losses(resumed)) == 1
        same(resumed, found["ep1"][2:])

    # megatron-core DDP and the optimizer hold the adapters only; the planner counts as many
    for name in ("tp2_etp2", "ep1"):  # (ep1's figures are used below)
        line = logs[name].split("lora: ")[1].split("\n")[0]
        held = {k: int(v.replace(",", "")) for k, v in re.findall(r"(trainable|frozen|buffers|state for) ([\d,]+)",
                                                                  line)}
        recipe = load_recipe(tmp_path / name / "recipe.yaml")
        model = read_model(recipe.model.path)
        layout = plan_layout(recipe, model)
        planned = sum(stage_adapter_params(recipe, model, layout, 0))
        assert held["trainable"] == held["buffers"] == planned > 0, (name, held, planned)
    assert held["state for"] * 2 == planned  # the distributed optimizer: half on each of the 2 ranks
    assert held["frozen"] == sum(stage_params(model, layout, 0))  # the whole base

    # the checkpoint holds the adapters (and their optimizer state), not the base
    tensors = plain_tensors(tmp_path / "ep2" / "checkpoints" / "step_000002")
    weights = [k for k in tensors if not k.startswith("optimizer.")]
    assert weights and all(".lora." in k for k in weights)
    assert sum(tensors[k].numel() for k in weights) == planned


# Mixtral's layers are the generic case of the others (routed experts only, no shared expert, no
# MLA) and its conversion has its own round-trip test: left out to keep CI's time.
@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "mixtral_8x7b"])
def test_merged_export_gives_the_adapted_model_to_transformers(tmp_path, family):
    """Convert in, train adapters on every linear layer and the router, export with the adapters
    merged: transformers' logits of the merged model equal the trainer's adapted model's. The
    Qwen2-MoE and Qwen3-MoE runs leave the router out (PEFT cannot hold it), so their adapters
    (attention, the routed experts as PEFT's target_parameters, Qwen2's shared expert) also go
    out as a PEFT folder: `peft` loads it on the base model and gives the merged model's logits."""
    import torch
    from transformers import AutoModelForCausalLM

    from tests.test_convert import convert, verify

    peft_case = family.startswith(("qwen2", "qwen3"))
    targets = ["model.lora.target_modules=[all-linear]" if peft_case else "model.lora.target_modules=[all-linear,router]"]
    hf = save_tiny_model(family, tmp_path / "hf")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (hf / name).write_bytes((REPO / "recipes" / "models" / "tiny_moe" / name).read_bytes())
    assert convert("hf-to-mcore", "--hf-model-path", hf, "--output-path", tmp_path / "mcore")[0] == 0
    lora_run(tmp_path / "run", tmp_path / "mcore", f"model.path={hf}", *targets, "optim.lr=1e-2",
             "megatron.expert_model_parallel_size=1", nproc=1, steps=1)
    checkpoints = tmp_path / "run" / "checkpoints"
    if family == FAMILIES[0]:  # without the flag: what to do instead; PEFT cannot hold router adapters
        rc, _, err = convert("mcore-to-hf", "--mcore-path", checkpoints, "--hf-model-path", hf,
                             "--output-path", tmp_path / "plain")
        assert rc == 2 and "a LoRA checkpoint" in err and "--lora-merge" in err
        rc, _, err = convert("mcore-to-hf", "--mcore-path", checkpoints, "--hf-model-path", hf,
                             "--output-path", tmp_path / "peft", "--lora-adapter")
        assert rc == 2 and "PEFT cannot hold the adapters of" in err and "--lora-merge" in err, err
        assert not (tmp_path / "peft").exists()
    rc, _, err = convert("mcore-to-hf", "--mcore-path", checkpoints, "--hf-model-path", hf,
                         "--output-path", tmp_path / "merged", "--lora-merge")
    assert rc == 0, err
    before, after = read_all(hf), read_all(tmp_path / "merged")
    changed = {n for n in before if not before[n].equal(after[n])}
    assert changed and all(("norm" not in n and "embed" not in n) for n in changed)
    assert verify(tmp_path / "merged", checkpoints / "step_000001") < 1e-4
    if not peft_case:
        return
    peft = pytest.importorskip("peft")
    rc, _, err = convert("mcore-to-hf", "--mcore-path", checkpoints, "--hf-model-path", hf,
                         "--output-path", tmp_path / "adapter", "--lora-adapter")
    assert rc == 0, err
    tokens = torch.randint(512, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()(tokens)
        base = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
        plain = base(tokens)
        adapted = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()(tokens)  # adapts `base`
    assert float((merged.logits - adapted.logits).abs().max()) < 1e-4
    assert float((merged.logits - plain.logits).abs().max()) > 1e-2  # the adapters do something


def test_the_planner_counts_lora_and_refuses_what_it_cannot_run():
    recipes = REPO / "recipes"
    code, out, err = run_launcher("validate", str(recipes / "deepseek_v3_lora.yaml"), "--cluster", "slurm")
    assert code == 0, err
    code, out, err = run_launcher("plan", str(recipes / "deepseek_v3.yaml"), "--cluster", "slurm",
                                  "model.lora.rank=32", "megatron.dist_checkpointing_path=/base", "--json")
    import json

    lora_plan = json.loads(out)
    _, out, _ = run_launcher("plan", str(recipes / "deepseek_v3.yaml"), "--cluster", "slurm", "--json")
    full_plan = json.loads(out)
    assert lora_plan["memory_gib"]["grads"] < full_plan["memory_gib"]["grads"] / 20
    assert lora_plan["memory_gib"]["optimizer"] < 3 and lora_plan["fits"]
    code, out, err = run_launcher("validate", str(recipes / "qwen3_235b_a22b_lora.yaml"), "--cluster", "slurm")
    assert code == 0 and " 16 GPUs" in out, err
    assert " 32 GPUs" in run_launcher("validate", str(recipes / "qwen3_235b_a22b.yaml"), "--cluster", "slurm")[1]

    tiny = str(recipes / "tiny_moe.yaml")
    for overrides, message in [
            (["model.lora.rank=8"], "set megatron.dist_checkpointing_path"),
            (["model.lora.rank=8", "megatron.dist_checkpointing_path=/b", "model.lora.target_modules=[qkv]"],
             "'qkv' is not a module LoRA can adapt; valid: linear_qkv, linear_proj"),
            (["model.lora.rank=8", "megatron.dist_checkpointing_path=/b", "trainer.n_gpus_per_node=2",
              "megatron.expert_tensor_parallel_size=2", "megatron.expert_model_parallel_size=1"],
             "adapters on the routed experts need megatron.expert_tensor_parallel_size 1 or equal to "
             "tensor_model_parallel_size (1); it is 2")]:
        code, _, err = run_launcher("validate", tiny, "--cluster", "local", *overrides)
        assert code == 2 and message in err and "Traceback" not in err, err
