"""The transformer-engine path against the TE-free one, on GPUs: checks that assert, and a
JSON record of every number they compared (bench/results/NAME.json, and $OUT/NAME.json).

    python3 bench/te_check.py NAME [--families a,b] [--checks families,resume,cp]   (cp: two GPUs)

For each family's tiny model (a shrunken copy of its published config.json, random weights,
built with transformers and converted with `launcher convert hf-to-mcore`):
1. convert: the converted checkpoint loads under transformer-engine's layer spec and gives
   transformers' logits (`launcher convert check`, float32), and the TE model's checkpoint
   keys are the TE-free model's.
2. first step: from that checkpoint, one forward and backward over the same two rows, packed
   and one sample per row: loss and gradient norm under TE (THD packed sequences) and TE-free
   (flash attention over sample boundaries), bf16. Tolerance: relative 1e-2 on the loss,
   5e-2 on the gradient norm (bf16 has 8 bits of mantissa; the paths differ in kernels).
3. boundaries: under TE, new tokens in one packed sample leave every other sample's
   per-token losses as they were; the same change without sample boundaries (one causal
   sequence) moves them, so the check would catch attention across a boundary.
For one family (Qwen3-MoE), checkpoints interchange: a TE-free run resumed from a TE run's
checkpoint and the other way round give the uninterrupted runs' losses, and
`launcher convert mcore-to-hf` reads the TE checkpoint (transformers gets its logits).
cp: transformer-engine's context-parallel attention over packed samples (CP=2, two
processes), and the TE-free path's (trainer.model.cp_attention), give the one-GPU TE-free loss
and gradient norm, for every family.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
WORK = Path("/tmp/te-check")
LENGTH, ROWS = 256, 2
LOSS_TOL, NORM_TOL = 1e-2, 5e-2


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


ORIGINAL_ENV = dict(os.environ)


def child_env(te: bool = True) -> dict:
    """A child process's environment: this one's as it started (not the process group this
    process made for itself, nor the switches its checks set), on the path asked for."""
    from bench.gpu_speed import python_path

    return {**ORIGINAL_ENV, "MOE_TRANSFORMER_ENGINE": "1" if te else "0", "PYTHONPATH": python_path(te)}


def launcher(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from launcher.cli import main; raise SystemExit(main())", *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, env=child_env(), timeout=600)


def prepare(family: str) -> tuple[Path, Path]:
    """The family's tiny Hugging Face model (with the tiny recipe's tokenizer) and its conversion."""
    import shutil

    from tests.conftest import RECIPES
    from tests.hf_models import save_tiny_model

    hf, mcore = WORK / family / "hf", WORK / family / "mcore"
    if not (mcore / "common.pt").exists():
        shutil.rmtree(WORK / family, ignore_errors=True)
        save_tiny_model(family, hf)
        if family == "deepseek_v3":  # transformers builds no multi-token-prediction layer: add one
            from tests.test_convert import _add_mtp_layer

            _add_mtp_layer(hf, layers=hf_layers(hf))
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(RECIPES / "models" / "tiny_moe" / name, hf / name)
        out = launcher("convert", "hf-to-mcore", "--hf-model-path", hf, "--output-path", mcore,
                       *(["--mtp"] if family == "deepseek_v3" else []))
        assert out.returncode == 0, out.stderr[-2000:]
    return hf, mcore


def hf_layers(hf: Path) -> int:
    return json.loads((hf / "config.json").read_text())["num_hidden_layers"]


def recipe_for(hf: Path, mcore: Path, family: str, *overrides: str):
    from launcher.recipe import load_recipe

    return load_recipe(REPO / "recipes" / "tiny_moe.yaml", [
        f"model.path={hf}", f"megatron.dist_checkpointing_path={mcore}", f"data.max_length={LENGTH}",
        f"data.micro_batch_size={ROWS}", f"data.global_batch_size={ROWS}", "trainer.n_gpus_per_node=1",
        "megatron.expert_model_parallel_size=1", "data.val_files=[]",
        *(["model.enable_mtp=true"] if family == "deepseek_v3" else []), *overrides])


def rows_of(recipe, packed: bool, align: int = 1) -> list:
    import dataclasses

    from trainer.data.batches import SFTData
    from trainer.data.chat import load_tokenizer

    data = dataclasses.replace(recipe.data, pack_sequences=packed, shuffle=False)
    stream = SFTData(recipe.data.train_files, data, load_tokenizer(recipe.model.tokenizer_path), 0, align).rows(0)
    return [next(stream) for _ in range(ROWS)]


def build(recipe, te: bool):
    """This process's model under one path, from the recipe's converted checkpoint."""
    import torch

    from trainer import checkpoint
    from trainer.model.build import build_model

    os.environ["MOE_TRANSFORMER_ENGINE"] = "1" if te else "0"
    model = build_model(recipe, torch.bfloat16, pre_process=True, post_process=True).cuda()
    checkpoint.load_weights(Path(recipe.megatron.dist_checkpointing_path), [model])
    return model


def per_token_losses(model, batch: dict):
    from trainer.model import thd

    if batch.get("rows"):  # what the trainer's forward step records (trainer.model.thd)
        thd.mark_rows(model.config, *batch["rows"])
    out = model(batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"],
                loss_mask=batch["loss_mask"], packed_seq_params=batch.get("packed_seq_params"))
    return out.float().reshape(-1)


def first_step(model, batch: dict, group=None) -> dict:
    """Loss (mean over response tokens) and gradient norm of one forward and backward. With a
    process group (context parallelism) the sums and gradients are added over it."""
    import torch
    import torch.distributed as dist

    model.zero_grad(set_to_none=True)
    losses = per_token_losses(model, batch)
    mask = batch["loss_mask"].reshape(-1) > 0
    total = torch.where(mask, losses, 0.0).sum()
    count = mask.sum().float()
    sums = torch.stack([total.detach(), count])
    if group is not None:
        dist.all_reduce(sums, group=group)
    (total / sums[1]).backward()
    squares = torch.zeros((), device="cuda")
    parts: dict[str, float] = {}  # squared gradient norm by kind of weight: where two paths differ
    for name, param in model.named_parameters():
        if param.grad is not None:
            if group is not None:
                dist.all_reduce(param.grad, group=group)
            square = param.grad.float().pow(2).sum()
            squares += square
            kind = next((k for k in ("embedding", "output_layer", "router", "experts", "linear_qkv", "linear_q",
                                     "linear_kv", "linear_proj", "linear_fc", "norm") if k in name), "other")
            parts[kind] = parts.get(kind, 0.0) + float(square)
    return {"loss": float(sums[0] / sums[1]), "grad_norm": float(squares.sqrt()),
            "grad_norm_by_kind": {k: round(v ** 0.5, 5) for k, v in sorted(parts.items())}}


def checkpoint_keys(model) -> list[str]:
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    from trainer.checkpoint import _model_state

    state = _model_state([model])
    apply_factories(state)
    return sorted(v.key for v in nested_values(state) if isinstance(v, ShardedTensor))


def family_checks(family: str) -> dict:
    """Steps 1 to 3 for one family, in this process (one GPU, megatron-core set up once)."""
    import torch
    from megatron.core import parallel_state as ps

    from trainer.data.batches import collate
    from trainer.loop import setup

    hf, mcore = prepare(family)
    result = {}
    out = launcher("convert", "verify", "--hf-model-path", hf, "--mcore-path", mcore, "--atol", "5e-2")
    result["convert_check_te"] = out.stdout.strip().splitlines()[-1:] if out.returncode == 0 else \
        {"error": (out.stderr or out.stdout).strip()[-600:]}
    recipe = recipe_for(hf, mcore, family)
    if not ps.model_parallel_is_initialized():
        setup(recipe)
    keys = {}
    for packed in (True, False):
        rows = rows_of(recipe, packed)
        label = "packed" if packed else "one_sample_per_row"
        steps = {}
        for te in (True, False):
            model = build(recipe, te)
            if packed:
                keys["te" if te else "te_free"] = checkpoint_keys(model)
            batch = collate(rows, "cuda", "thd" if te else "boundaries")
            steps["te" if te else "te_free"] = first_step(model, batch)
            if te and packed:
                result["boundaries"] = boundary_check(model, rows)
            del model
            torch.cuda.empty_cache()
        steps["loss_rel"] = relative(steps["te"]["loss"], steps["te_free"]["loss"])
        steps["grad_norm_rel"] = relative(steps["te"]["grad_norm"], steps["te_free"]["grad_norm"])
        result[f"first_step_{label}"] = steps
    only_te = sorted(set(keys["te"]) - set(keys["te_free"]))
    only_free = sorted(set(keys["te_free"]) - set(keys["te"]))
    result["checkpoint_keys"] = {"count": len(keys["te"]), "only_te": only_te[:10], "only_te_free": only_free[:10]}
    return result


def boundary_check(model, rows) -> dict:
    """Per-token losses of the other samples, before and after new tokens in the first sample
    of the first row: with THD boundaries, and as one causal sequence (no boundaries)."""
    import numpy as np
    import torch

    from trainer.data.batches import Row, collate

    first = rows[0]
    changed_tokens = first.tokens.copy()
    inside = np.flatnonzero(first.sample == 0)
    changed_tokens[inside[1:]] = np.random.default_rng(0).integers(3, 500, len(inside) - 1)
    changed = [Row(changed_tokens, first.labels, first.loss_mask, first.sample), *rows[1:]]
    others = torch.from_numpy(np.concatenate([r.sample for r in rows]) != 0).cuda()
    others[len(first.sample):] = True  # every sample of the other rows
    moved = {}
    with torch.no_grad():
        for name in ("thd", "no_boundaries"):
            losses = []
            for batch_rows in (rows, changed):
                batch = collate(batch_rows, "cuda", "thd")
                if name == "no_boundaries":
                    batch["packed_seq_params"] = None  # one causal sequence over both rows
                losses.append(per_token_losses(model, batch))
            moved[name] = float((losses[0] - losses[1])[others].abs().max())
            moved[f"{name}_changed_sample"] = float((losses[0] - losses[1])[~others].abs().max())
    return moved


def resume_checks(result: dict, family: str = "qwen3_235b_a22b") -> None:
    """TE and TE-free runs continue each other's checkpoints (trainer under torchrun, 4 steps,
    a checkpoint every 2), and mcore-to-hf reads the TE run's checkpoint; into `result` as
    they finish, so a failure keeps what ran before it."""
    import shutil

    hf, mcore = prepare(family)
    overrides = ["trainer.total_training_steps=4", "trainer.save_freq=2", "trainer.test_freq=-1"]

    def train(name: str, te: bool, start_from: Path | None = None) -> list[float]:
        run = WORK / "resume" / name
        shutil.rmtree(run, ignore_errors=True)
        (run / "checkpoints").mkdir(parents=True)
        if start_from is not None:  # the other run's step-2 checkpoint, as this run's latest
            shutil.copytree(start_from, run / "checkpoints" / start_from.name)
            (run / "checkpoints" / "latest").write_text(start_from.name)
        recipe = recipe_for(hf, mcore, family, *overrides, f"trainer.default_local_dir={run / 'checkpoints'}")
        (run / "recipe.yaml").write_text(recipe.to_yaml())
        out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
                              "-m", "trainer", "--config", str(run / "recipe.yaml")], cwd=run, env=child_env(te),
                             capture_output=True, text=True, timeout=400)
        if out.returncode != 0:
            log = out.stdout + out.stderr
            if "OUT" in os.environ:
                Path(os.environ["OUT"], f"resume-{name}.log").write_text(log[-200000:])
            first = [line for line in log.splitlines() if "Error" in line and "ChildFailedError" not in line]
            raise AssertionError(f"{name}: {' | '.join(first[:3])}"[:1500])
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in records if "loss" in r]

    result["te"] = train("te", True)
    result["te_free"] = train("te_free", False)
    result["te_free_from_te"] = train("te_free_from_te", False, WORK / "resume" / "te" / "checkpoints" / "step_000002")
    result["te_from_te_free"] = train("te_from_te_free", True,
                                      WORK / "resume" / "te_free" / "checkpoints" / "step_000002")
    result["te_free_from_te_rel"] = max(relative(a, b) for a, b in zip(result["te_free_from_te"], result["te"][2:]))
    result["te_from_te_free_rel"] = max(relative(a, b) for a, b in zip(result["te_from_te_free"],
                                                                         result["te_free"][2:]))
    te_ckpt = WORK / "resume" / "te" / "checkpoints" / "step_000004"
    back = WORK / "resume" / "te_to_hf"
    shutil.rmtree(back, ignore_errors=True)
    out = launcher("convert", "mcore-to-hf", "--mcore-path", te_ckpt, "--hf-model-path", hf, "--output-path", back)
    assert out.returncode == 0, out.stderr[-2000:]
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(hf / name, back / name)
    out = launcher("convert", "verify", "--hf-model-path", back, "--mcore-path", te_ckpt, "--atol", "5e-2")
    result["mcore_to_hf_of_te_checkpoint"] = out.stdout.strip().splitlines()[-1:] if out.returncode == 0 else \
        {"error": (out.stderr or out.stdout).strip()[-600:]}


# With per-token loss scaling megatron-core weighs each rank's load-balancing loss by the tokens
# it routes, so under CP (and SP) that gradient shrinks by the CP (TP) size against one GPU; the
# CP check compares attention and everything else with that term off (as tests/test_trainer.py).
NO_AUX_LOSS = ("model.override_config.moe_config.aux_loss_coeff=0",)


def cp_worker(families: list[str], reference: Path, out: Path) -> None:
    """Under torchrun with two processes: CP=2 through transformer-engine, against the one-GPU
    TE-free first step on the same rows (read from `reference`)."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from trainer.data.batches import collate
    from trainer.loop import on_this_cp_rank, setup

    expected = json.loads(reference.read_text())
    results = {}
    for i, family in enumerate(families):
        try:
            hf, mcore = WORK / family / "hf", WORK / family / "mcore"
            recipe = recipe_for(hf, mcore, family, "trainer.n_gpus_per_node=2", "megatron.context_parallel_size=2",
                                *NO_AUX_LOSS)
            if i == 0:
                setup(recipe)
            rows = rows_of(recipe, packed=True, align=4)
            ref = expected[family]
            results[family] = {"te_free_cp1": ref}
            # transformer-engine's CP attention (THD), then the TE-free pieces (trainer.model.cp_attention)
            for label, te, form in (("te_cp2", True, "thd"), ("te_free_cp2", False, "boundaries")):
                model = build(recipe, te=te)
                batch = on_this_cp_rank(collate(rows, "cuda", form, align=4 if te else 1))
                step = first_step(model, batch, group=ps.get_context_parallel_group())
                prefix = "" if te else "te_free_"
                results[family].update({label: step, f"{prefix}loss_rel": relative(step["loss"], ref["loss"]),
                                        f"{prefix}grad_norm_rel": relative(step["grad_norm"], ref["grad_norm"])})
                del model
        except Exception:  # noqa: BLE001 - record and go on to the next family
            results[family] = {"error": traceback.format_exc()[-1500:]}
    if dist.get_rank() == 0:
        out.write_text(json.dumps(results))
    dist.barrier()


def cp_reference(families: list[str], path: Path) -> None:
    """One GPU, TE-free: the first step on the rows that CP=2 packs (samples aligned to 4)."""
    from megatron.core import parallel_state as ps

    from trainer.data.batches import collate
    from trainer.loop import setup

    found = {}
    for family in families:
        hf, mcore = prepare(family)  # (made by the family checks when they ran first)
        recipe = recipe_for(hf, mcore, family, *NO_AUX_LOSS)
        if not ps.model_parallel_is_initialized():
            setup(recipe)
        model = build(recipe, te=False)
        found[family] = first_step(model, collate(rows_of(recipe, packed=True, align=4), "cuda", "boundaries"))
        del model
    path.write_text(json.dumps(found))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("name")
    parser.add_argument("--families", default="mixtral_8x7b,qwen2_moe_a2_7b,qwen3_235b_a22b,deepseek_v3")
    parser.add_argument("--checks", default="families,resume")
    parser.add_argument("--cp-worker", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    families = [f for f in args.families.split(",") if f]
    checks = args.checks.split(",")
    global WORK
    WORK = WORK / args.name  # invocations side by side keep apart
    # plain weight gradients (the checks have no DDP main-gradient buffers)
    os.environ["MOE_PLAIN_KERNELS"] = ",".join(x for x in (os.environ.get("MOE_PLAIN_KERNELS", ""), "grad_accum") if x)
    if args.cp_worker:
        return cp_worker(families, *args.cp_worker)

    import torch

    from bench.gpu_speed import versions

    WORK.mkdir(parents=True, exist_ok=True)
    out_dir = Path(os.environ.get("OUT", REPO / "bench" / "out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"device": torch.cuda.get_device_name(), "versions": versions(),
              "tolerance": {"loss_rel": LOSS_TOL, "grad_norm_rel": NORM_TOL}, "families": {}, "failures": []}

    def save():
        (out_dir / f"{args.name}.json").write_text(json.dumps(result, indent=1))

    # megatron-core's process group for this process (one GPU)
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT", "29533"))
    for family in families if "families" in checks else []:
        try:
            result["families"][family] = family_checks(family)
        except Exception:  # noqa: BLE001 - record, go on, fail at the end
            result["families"][family] = {"error": traceback.format_exc()[-2000:]}
        print(family, json.dumps(result["families"][family])[:3000], flush=True)
        save()
    if "resume" in checks:
        result["resume"] = {}
        try:
            resume_checks(result["resume"])
        except Exception:  # noqa: BLE001
            result["resume"]["error"] = traceback.format_exc()[-2000:]
        print("resume", json.dumps(result["resume"])[:3000], flush=True)
        save()
    if "cp" in checks:
        reference, cp_out = WORK / "cp_reference.json", WORK / "cp_result.json"
        try:
            cp_reference(families, reference)
            proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                                   str(Path(__file__).resolve()), args.name, "--families", ",".join(families),
                                   "--cp-worker", str(reference), str(cp_out)],
                                  capture_output=True, text=True, timeout=400,
                                  env={**child_env(), "MOE_PLAIN_KERNELS": os.environ["MOE_PLAIN_KERNELS"]})
            result["context_parallel"] = json.loads(cp_out.read_text()) if cp_out.exists() else \
                {"error": (proc.stdout + proc.stderr)[-3000:]}
        except Exception:  # noqa: BLE001
            result["context_parallel"] = {"error": traceback.format_exc()[-2000:]}
        print("context_parallel", json.dumps(result["context_parallel"])[:3000], flush=True)
        save()
    result["failures"] = failures(result)
    save()
    print("failures:", json.dumps(result["failures"], indent=1))
    assert not result["failures"], "transformer-engine and TE-free paths differ (see failures)"


def failures(result: dict) -> list[str]:
    found = []
    for family, checks in result["families"].items():
        if "error" in checks:
            found.append(f"{family}: {checks['error'].strip().splitlines()[-1]}")
            continue
        if isinstance(checks.get("convert_check_te"), dict):
            found.append(f"{family}: convert check under TE: {checks['convert_check_te']['error'][-200:]}")
        for label in ("first_step_packed", "first_step_one_sample_per_row"):
            step = checks[label]
            if not (step["loss_rel"] < LOSS_TOL and step["grad_norm_rel"] < NORM_TOL):
                found.append(f"{family} {label}: loss {step['loss_rel']:.2e}, grad norm {step['grad_norm_rel']:.2e}")
        keys = checks["checkpoint_keys"]
        if keys["only_te"] or keys["only_te_free"]:
            found.append(f"{family}: checkpoint keys differ: TE only {keys['only_te'][:3]}, "
                         f"TE-free only {keys['only_te_free'][:3]}")
        moved = checks["boundaries"]
        if not (moved["thd"] < 1e-2 and moved["no_boundaries"] > 1e-2 and moved["thd_changed_sample"] > 1e-2):
            found.append(f"{family}: packed-sample boundaries: {moved}")
    resume = result.get("resume")
    if resume is not None:
        if "error" in resume:
            found.append(f"resume: {resume['error'].strip().splitlines()[-1]}")
        else:
            for key in ("te_free_from_te_rel", "te_from_te_free_rel"):
                if not resume[key] < LOSS_TOL:
                    found.append(f"resume {key}: {resume[key]:.2e}")
            if isinstance(resume["mcore_to_hf_of_te_checkpoint"], dict):
                found.append(f"mcore-to-hf of a TE checkpoint: {resume['mcore_to_hf_of_te_checkpoint']}")
    cp = result.get("context_parallel") or {}
    if isinstance(cp.get("error"), str):
        found.append(f"CP: {cp['error'].strip().splitlines()[-1]}")
        cp = {}
    for family, checks in cp.items():
        if "error" in checks:
            found.append(f"CP {family}: {str(checks['error']).strip().splitlines()[-1]}")
            continue
        for prefix in ("", "te_free_"):
            if not (checks[f"{prefix}loss_rel"] < LOSS_TOL and checks[f"{prefix}grad_norm_rel"] < NORM_TOL):
                found.append(f"CP {prefix}{family}: loss {checks[f'{prefix}loss_rel']:.2e}, "
                             f"grad norm {checks[f'{prefix}grad_norm_rel']:.2e}")
    return found


if __name__ == "__main__":
    main()
