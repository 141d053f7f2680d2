"""The trainer against `transformers` on one GPU, in one invocation on one machine.

    python3 bench/gpu_speed.py NAME [--models qwen3_moe_8l,qwen3_30b_a3b_slice] [--hf-mb 1,2,4]
        [--ours-mb 1,2,4] [--ablate attention,norm,grad_accum,adam,permute] [--extra plain,bf16_grads,long]
        [--te-mb 4,8] [--te-ablate flex_attention] [--lora-mb 4] [--gpus 2] [--set KEY=VALUE ...]

Runs the bf16 matmul ceiling (an 8192^3 product), checks each fused kernel against the plain
code it replaces (asserts), then for each model `transformers` and the trainer at each
micro-batch size, the trainer with each fused piece turned off (ablation), and the extras:
`plain` (every piece off: the trainer as it was), `bf16_grads` (megatron.grad_reduce_in_fp32
false), `one_tokeniser` (data.num_workers=0: the data worker tokenises alone), `long` (one 4096-token sample per row: the same attention work as `transformers`). `ours` is
the TE-free path (MOE_TRANSFORMER_ENGINE=0); `--te-mb` adds `ours_te`, the transformer-engine
path that the job image runs (and `ours_te_long`); `--lora-mb` adds `ours_lora`, LoRA rank 16
on a frozen base.
Writes bench/results/NAME.json (and $OUT/NAME.json when $OUT is set) and prints a table.
The FLOP formula is bench/README.md's.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from trainer.model.fused import KERNELS  # noqa: E402
RECIPE = REPO / "bench" / "qwen3_moe_mid.yaml"
LENGTH, ROWS, STEPS = 4096, 8, 10
EVERY_ROW: list[str] = []  # --set: recipe overrides for every trainer row


def versions() -> dict:
    import torch

    found = {"torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("megatron.core", "transformers", "transformer_engine"):
        try:
            found[name] = __import__(name, fromlist=["__version__"]).__version__
        except ImportError:
            found[name] = None
    return found


def matmul_ceiling() -> float:
    """TFLOP/s of an 8192^3 bf16 product on random data (median of 10 after 3 warm-ups)."""
    import torch

    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n ** 3 / statistics.median(times) / 1e12


def python_path(te: bool) -> str:
    """PYTHONPATH for a trainer process: transformer-engine's site (MOE_TE_SITE, where the GPU
    machines install it apart from the rest) only on the TE path. megatron-core takes TE's
    optimizer and multi-tensor kernels whenever TE imports, so the TE-free rows run without it
    on the path, as they do on a machine without it."""
    site = os.environ.get("MOE_TE_SITE")
    parts = [p for p in [str(REPO), *os.environ.get("PYTHONPATH", "").split(":")] if p and p != site]
    return ":".join(([site] if te and site else []) + parts)


def te_imports() -> bool:
    """Whether the TE rows would run transformer-engine (without it the trainer quietly takes
    the TE-free spec, and the row would be a second TE-free one)."""
    check = subprocess.run([sys.executable, "-c", "import transformer_engine.pytorch"], capture_output=True,
                           env={**os.environ, "PYTHONPATH": python_path(True)})
    return check.returncode == 0


def relative_error(out, ref) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def check_kernels() -> dict:
    """Each fused piece against the plain code, forward and backward, on fresh random inputs."""
    import types

    import torch
    import torch.nn.functional as F

    from trainer.model import fused, norm
    from trainer.model.attention import SDPAttention, _varlen_attn, boundaries_to_mask

    errors = {}
    torch.manual_seed(0)
    # attention: flash over samples vs SDPA under the dense mask; GQA, and MLA's narrower values
    for label, heads, kv_heads, dim, value_dim in (("gqa", 16, 4, 128, 128), ("mla", 16, 16, 192, 128)):
        s, b = 2048, 2
        q = torch.randn(s, b, heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(s, b, kv_heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(s, b, kv_heads, value_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        cuts = sorted(set(torch.randint(1, b * s, (40,)).tolist()) | {s})
        cu = torch.tensor([0, *cuts, b * s], dtype=torch.int32, device="cuda").unique()
        cu.max_seqlen = int(cu.diff().max())
        cu.sample_ids = (torch.searchsorted(cu, torch.arange(b * s, device="cuda", dtype=torch.int32), right=True)
                         - 1).view(b, s)
        config = types.SimpleNamespace(context_parallel_size=1, kv_channels=dim, attention_dropout=0.0)
        attention = SDPAttention(config, 1, None, "self")
        assert _varlen_attn() is not None, "torch has no varlen_attn"
        grad = torch.randn(s, b, heads * value_dim, device="cuda", dtype=torch.bfloat16)
        paths = {"dense": lambda: attention(q, k, v, boundaries_to_mask(cu, b, s)),
                 "attention": lambda: attention._attend_samples(q, k, v, cu)}
        if value_dim == dim:
            paths["flex_attention"] = lambda: attention._attend_flex(q, k, v, cu)
        outs = {}
        for path, run in paths.items():
            out = run()
            out.backward(grad)
            outs[path] = (out.detach(), *(t.grad.clone() for t in (q, k, v)))
            for t in (q, k, v):
                t.grad = None
        for path in paths.keys() - {"dense"}:
            errors[f"{path}_{label}"] = max(relative_error(a, r) for a, r in zip(outs[path], outs["dense"]))
        # context parallelism (CP=2): each rank's pieces through flash, against its rows of the dense
        # output; the ranks' gradients summed against the dense gradients
        from trainer.model import cp_attention

        host, grads = cu.cpu().numpy(), [torch.zeros_like(t) for t in (q, k, v)]
        outs_cp = []
        for rank in range(2):
            mine = torch.from_numpy(cp_attention.rank_positions(s, 2, rank)).cuda()
            spans = cp_attention.spans_on_device(cp_attention.rank_spans(host, b, s, 2, rank), "cuda")
            keys_values = cp_attention.in_gathered_order(k, v, 2)
            out = cp_attention.attend(q[mine], keys_values, k.shape[-1], spans, attention.softmax_scale,
                                      _varlen_attn())
            out.backward(grad[mine])
            outs_cp.append(relative_error(out.detach(), outs["dense"][0][mine]))
            for total, t in zip(grads, (q, k, v)):
                total += t.grad
                t.grad = None
        errors[f"cp_attention_{label}"] = max(outs_cp + [relative_error(a, r) for a, r in zip(grads, outs["dense"][1:])])
    # RMSNorm, compiled vs plain
    x = torch.randn(4096, 2, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    fused.install()
    results = []
    for fn in (norm.rms_norm, lambda x, w, e: F.rms_norm(x.double(), (x.shape[-1],), w.double(), e)):
        out = fn(x, w, 1e-6)
        out.backward(torch.ones_like(out))
        results.append((out.detach(), x.grad.clone(), w.grad.clone()))
        x.grad = w.grad = None
    errors["norm"] = max(relative_error(a, r) for a, r in zip(*results))
    # weight gradient straight into an fp32 main gradient
    inputs = torch.randn(8192, 2048, device="cuda", dtype=torch.bfloat16)
    grad_out = torch.randn(8192, 4096, device="cuda", dtype=torch.bfloat16)
    main_grad = torch.randn(4096, 2048, device="cuda")
    ref = main_grad.double() + grad_out.double().t() @ inputs.double()
    fused.wgrad_accumulate(inputs, grad_out, main_grad)
    errors["grad_accum"] = relative_error(main_grad, ref)
    # a bf16 gradient into an fp32 main gradient (an odd size: the last block is partial)
    main_grad, part = torch.randn(10_000_019, device="cuda"), torch.randn(10_000_019, device="cuda").bfloat16()
    ref = main_grad + part.float()
    fused.add_into(main_grad, part)
    errors["grad_add"] = relative_error(main_grad, ref)
    # token permutation without host synchronisation vs megatron-core's
    from megatron.core.transformer.moe import moe_utils

    from trainer.model import dispatch

    tokens, experts, topk = 8192, 32, 4
    scores = torch.rand(tokens, experts, device="cuda")
    routing_map = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, scores.topk(topk, dim=1).indices, True)
    probs = torch.where(routing_map, scores, 0.0)
    hidden = torch.randn(tokens, 2048, device="cuda", dtype=torch.bfloat16)
    grad = torch.randn_like(hidden)
    results = []
    for permute, unpermute in ((dispatch.permute, dispatch.unpermute), (moe_utils.permute, moe_utils.unpermute)):
        x = hidden.clone().requires_grad_()
        permuted, permuted_probs, indices = permute(x, routing_map, probs=probs, num_out_tokens=tokens * topk)
        out = unpermute(permuted * permuted_probs[:, None].to(permuted.dtype), indices, restore_shape=x.shape,
                        routing_map=routing_map)
        out.backward(grad)
        results.append((permuted.detach(), permuted_probs, out.detach(), x.grad))
    errors["permute"] = max(relative_error(a, r) for a, r in zip(*results))
    # grouped product with tokens per expert on the host (EP): no host wait, same as expert by expert
    from trainer.model import experts as grouped

    sizes = torch.distributions.Multinomial(4096, torch.ones(16)).sample().long()  # on the host
    a = torch.randn(4096, 1024, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(16, 1024, 512, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = grouped.gmm(a, b, sizes)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ref = torch.cat([part.double() @ w.double() for part, w in zip(a.split(sizes.tolist()), b)])
    errors["grouped_mm_host_sizes"] = relative_error(out, ref)
    # the output layer and loss in chunks (compiled) vs the whole fp32 logits; Qwen3's vocabulary
    from trainer.model import output_loss

    length, rows, vocab = 2048, 2, 151936
    hidden = torch.randn(length, rows, 2048, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(vocab, 2048, device="cuda", dtype=torch.bfloat16) / 32
    labels = torch.randint(0, vocab, (rows, length), device="cuda")
    mask = (torch.rand(rows, length, device="cuda") > 0.3).float()
    output_loss.compile_kernels()
    results = []
    for fused_path in (True, False):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        if fused_path:
            losses = output_loss.linear_cross_entropy(h, w, labels, mask)
        else:
            logits = (h.float() @ w.float().t()).transpose(0, 1)
            losses = F.cross_entropy(logits.reshape(-1, vocab), labels.reshape(-1), reduction="none").view(rows, length)
        torch.where(mask > 0, losses, 0.0).sum().backward()
        results.append((losses.detach(), h.grad, w.grad))
    errors["output_loss"] = max(relative_error(a, r) for a, r in zip(*results))
    for name, err in errors.items():
        assert err is None or err < 2e-2, f"{name}: relative error {err:.2e} against the plain code"
    return {k: (float(f"{v:.3g}") if v is not None else None) for k, v in errors.items()}


def model_flops_per_token(config: dict, context: float) -> float:
    """bench/README.md's formula: 6 x active matmul parameters + attention's 12 x layers x heads
    x head_dim x mean attended keys per token."""
    h, layers = config["hidden_size"], config["num_hidden_layers"]
    heads, kv, hd = config["num_attention_heads"], config["num_key_value_heads"], config.get("head_dim", 128)
    experts, topk, ffn = config["num_experts"], config["num_experts_per_tok"], config["moe_intermediate_size"]
    per_layer = h * heads * hd * 2 + h * kv * hd * 2 + h * experts + topk * 3 * h * ffn
    active = layers * per_layer + h * config["vocab_size"]  # the output layer; the embedding is a lookup
    return 6 * active + 12 * layers * heads * hd * context


def mean_context(rows) -> float:
    """Mean number of keys a real token attends to (itself and earlier tokens of its sample)."""
    import numpy as np

    total = count = 0
    for row in rows:
        real = row.sample[row.sample >= 0]
        for sample in np.unique(real):
            n = int((real == sample).sum())
            total += n * (n + 1) / 2
            count += n
    return total / count


def long_samples(path: Path) -> Path:
    """A parquet file of samples longer than 4096 tokens (cut to 4096 by truncation)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    words = "the model learns to sort lists of numbers and letters one step at a time".split()
    rows = [{"prompt": " ".join(words[(i + j) % len(words)] for j in range(600)),
             "response": " ".join(words[(i * 3 + j) % len(words)] for j in range(3600))} for i in range(64)]
    pq.write_table(pa.table({k: [r[k] for r in rows] for k in ("prompt", "response")}), path)
    return path


def trainer_rows_context(data_file: str, overrides: list[str]) -> float:
    from launcher.recipe import load_recipe
    from trainer.data.batches import SFTData
    from trainer.data.chat import load_tokenizer

    recipe = load_recipe(RECIPE, overrides)
    data = SFTData([data_file], recipe.data, load_tokenizer(recipe.model.tokenizer_path), 0)
    rows = [row for _, row in zip(range(32), data.rows(0))]
    return mean_context(rows)


def planner_gib(overrides: list[str]) -> float:
    out = subprocess.run([sys.executable, "-c", "from launcher.cli import main; main()", "plan", str(RECIPE), "--cluster", "local", "--json",
                          *overrides], capture_output=True, text=True, cwd=REPO)
    memory = json.loads(out.stdout)["memory_gib"]
    return round(memory["total"] - memory["overhead"], 2)


def run_hf(model_dir: Path, mb: int) -> dict:
    out = subprocess.run([sys.executable, str(REPO / "bench" / "hf_baseline.py"), str(model_dir),
                          "--micro-batch", str(mb), "--rows", str(ROWS), "--steps", "8", "--length", str(LENGTH)],
                         capture_output=True, text=True, timeout=400)
    if out.returncode != 0:
        return {"name": "hf", "micro_batch_size": mb, "error": (out.stderr or out.stdout).strip().splitlines()[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_ours(name: str, model_dir: Path, mb: int, overrides: list[str], plain: str = "", profile: Path | None = None,
             work: Path = Path("/tmp/bench-speed"), gpus: int = 1, te: bool = False) -> dict:
    """The trainer under torchrun, TE-free unless `te`; stopped by SIGKILL once its last step
    is logged (a benchmark keeps no checkpoint)."""
    run_dir = work / f"{name}-mb{mb}"
    started = time.time()
    subprocess.run(["rm", "-rf", str(run_dir)])
    run_dir.mkdir(parents=True)
    from launcher.recipe import load_recipe

    overrides = [f"model.path={model_dir}", f"data.micro_batch_size={mb}", f"data.global_batch_size={ROWS * gpus}",
                 f"trainer.n_gpus_per_node={gpus}", f"megatron.expert_model_parallel_size={gpus}",
                 f"trainer.total_training_steps={STEPS}", f"trainer.default_local_dir={run_dir / 'checkpoints'}",
                 "trainer.save_freq=-1", "trainer.test_freq=-1", *EVERY_ROW, *overrides]
    (run_dir / "recipe.yaml").write_text(load_recipe(RECIPE, overrides).to_yaml())
    env = {**os.environ, "MOE_PLAIN_KERNELS": plain, "PYTHONUNBUFFERED": "1", "MOE_TRANSFORMER_ENGINE": "1" if te else "0",
           "PYTHONPATH": python_path(te)}
    env.pop("MOE_TORCH_PROFILE", None)
    if profile:  # with the Python stacks of whatever makes the host wait
        env.update(MOE_TORCH_PROFILE=str(profile), MOE_TORCH_PROFILE_STACKS="1")
    log = open(run_dir / "log.txt", "w")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}",
                             "-m", "trainer", "--config", str(run_dir / "recipe.yaml")], cwd=run_dir, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 420
    steps: list[dict] = []
    while time.time() < deadline and proc.poll() is None:
        time.sleep(1)
        if metrics.exists():
            steps = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
            steps = [s for s in steps if "loss" in s]
            if len(steps) >= STEPS and (profile is None or profile.exists()):  # the profile is written after the log
                break
    stop_and_free_gpu(proc, run_dir / "recipe.yaml")
    log.close()
    row = {"name": name, "gpus": gpus, "micro_batch_size": mb, "plain_kernels": plain, "overrides": overrides[7:],
           "transformer_engine": te, "wall_s": round(time.time() - started)}
    if len(steps) < STEPS:
        lines = (run_dir / "log.txt").read_text().strip().splitlines()
        errors = [line for line in lines if "Error" in line or "error:" in line] or lines[-3:]
        if "OUT" in os.environ:
            (Path(os.environ["OUT"]) / f"{name}-mb{mb}.log").write_text("\n".join(lines[-200:]))
        return {**row, "error": " | ".join(errors[-3:])[-600:]}
    steady = steps[2:-2] if profile else steps[2:]
    median = statistics.median(s["step_time_s"] for s in steady)
    # tokens/s per GPU (the trainer logs the whole job's)
    return {**row, "tokens_per_s": round(statistics.median(s["tokens_per_s"] for s in steady) / gpus, 1),
            "step_time_s": round(median, 4),
            "data_wait_s": round(statistics.median(s["data_time_s"] for s in steady), 4), "peak_mem_gib": round(max(s["peak_memory_gib"] for s in steps), 2),
            "loss_first": steps[0]["loss"], "grad_norm_first": steps[0]["grad_norm"],
            "loss_last": steps[-1]["loss"], "planner_mem_gib": planner_gib(overrides),
            "expert_parallel_load": steps[-1].get("expert_parallel_load"),  # trainer.routing
            "dropped_fraction": steps[-1].get("moe_dropped_fraction")}  # with a capacity factor


def lora_base(model_dir: Path, work: Path = Path("/tmp/bench-lora")) -> Path:
    """A base checkpoint for LoRA rows: random bf16 weights from the config, saved by
    transformers and converted by `launcher convert hf-to-mcore` (weights only, no optimizer)."""
    hf, base = work / "hf", work / "base"
    subprocess.run(["rm", "-rf", str(work)])
    script = ("import sys, torch\nfrom transformers import AutoConfig, AutoModelForCausalLM\n"
              "config = AutoConfig.from_pretrained(sys.argv[1])\n"
              "AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(sys.argv[2])\n")
    subprocess.run([sys.executable, "-c", script, str(model_dir), str(hf)], check=True, timeout=300)
    subprocess.run([sys.executable, "-m", "trainer.convert", "hf-to-mcore", "--hf-model-path", str(hf),
                    "--output-path", str(base)], check=True, timeout=300, cwd=REPO,
                   env={**os.environ, "PYTHONPATH": python_path(False)})
    return base


def stop_and_free_gpu(proc, recipe: Path) -> None:
    """SIGKILL torchrun and its worker (elastic starts workers in their own sessions), then
    wait until their GPU memory is back, so the next run starts on an empty card."""
    import torch

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    subprocess.run(["pkill", "-9", "-f", str(recipe)])
    proc.wait()
    for _ in range(120):
        free, total = torch.cuda.mem_get_info()
        if free > 0.9 * total:
            return
        time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("name")
    parser.add_argument("--models", default="qwen3_moe_8l,qwen3_30b_a3b_slice")
    parser.add_argument("--hf-mb", default="1,2,4")
    parser.add_argument("--ours-mb", default="1,2,4")
    parser.add_argument("--ablate", default="", help="pieces to turn off one at a time (a+b: together)")
    parser.add_argument("--extra", default="plain,long")
    parser.add_argument("--gpus", default="", help="also run the best `ours` on these GPU counts, EP = GPUs, "
                        "8 rows per GPU a step (tokens/s per GPU)")
    parser.add_argument("--profile", nargs="?", const="ours", default="", choices=("ours", "ours_te"),
                        help="profile the last two steps of the best `ours` run (or of `ours_te`)")
    parser.add_argument("--te-mb", default="", help="the trainer with transformer-engine at these micro-batch "
                        "sizes (rows ours_te), and its long-sample row at the best")
    parser.add_argument("--te-ablate", default="", help="pieces to turn off one at a time in the transformer-engine "
                        "row, at its best micro-batch (rows ours_te_plain_PIECE)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a recipe override for every trainer row (repeatable)")
    parser.add_argument("--lora-mb", default="", help="LoRA (rank 16, the default targets) at these micro-batch "
                        "sizes (rows ours_lora), on a base converted from random Hugging Face weights")
    args = parser.parse_args()
    EVERY_ROW.extend(args.set)
    ints = lambda text: [int(x) for x in text.split(",") if x]  # noqa: E731
    words = lambda text: [x for x in text.split(",") if x]  # noqa: E731

    import torch

    out_dir = Path(os.environ.get("OUT", REPO / "bench" / "out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"device": torch.cuda.get_device_name(), "versions": versions(), "ceiling_tflops": None,
              "kernel_checks": None, "models": {}}

    def save():
        text = json.dumps(result, indent=1)
        (out_dir / f"{args.name}.json").write_text(text)

    result["ceiling_tflops"] = round(matmul_ceiling(), 1)
    result["kernel_checks"] = check_kernels()
    torch.cuda.empty_cache()  # the checks' cached blocks would be missing from every row's GPU
    print("ceiling", result["ceiling_tflops"], "TFLOP/s; kernel checks", result["kernel_checks"], flush=True)
    save()
    data = str(REPO / "recipes" / "data" / "tiny_sft.parquet")
    long_data = str(long_samples(Path("/tmp/bench-long.parquet")))
    long_overrides = [f"data.train_files={long_data}", "data.truncation=right"]
    for model in words(args.models):
        model_dir = REPO / "bench" / "models" / model
        config = json.loads((model_dir / "config.json").read_text())
        contexts = {"packed": trainer_rows_context(data, [f"model.path={model_dir}"]),
                    "long": trainer_rows_context(long_data, [f"model.path={model_dir}", *long_overrides]),
                    "hf": (LENGTH + 1) / 2}
        rows = []
        entry = {"config": {k: config[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                   "num_key_value_heads", "head_dim", "num_experts",
                                                   "num_experts_per_tok", "moe_intermediate_size", "vocab_size")},
                 "sequence": LENGTH, "rows_per_step": ROWS, "mean_context": contexts, "rows": rows}
        result["models"][model] = entry

        def add(row, context):
            if "tokens_per_s" in row:
                flops = model_flops_per_token(config, contexts[context]) * row["tokens_per_s"] / 1e12
                row.update(tflops_per_gpu=round(flops, 1), mfu=round(flops / result["ceiling_tflops"], 4),
                           context=context)
            rows.append(row)
            print(model, json.dumps(row), flush=True)
            save()

        for mb in ints(args.hf_mb):
            add(run_hf(model_dir, mb), "hf")
        for mb in ints(args.ours_mb):
            add(run_ours("ours", model_dir, mb, []), "packed")
        done = [r for r in rows if r["name"] == "ours" and "tokens_per_s" in r]
        best_mb = max(done, key=lambda r: r["tokens_per_s"])["micro_batch_size"] if done \
            else max(ints(args.ours_mb), default=1)
        for piece in words(args.ablate):  # a piece, or several joined by +
            add(run_ours(f"ours_plain_{piece}", model_dir, best_mb, [], plain=piece.replace("+", ",")), "packed")
        if "plain" in words(args.extra):
            add(run_ours("ours_plain", model_dir, 1, [], plain=",".join(KERNELS)), "packed")
        if "one_tokeniser" in words(args.extra):
            add(run_ours("ours_one_tokeniser", model_dir, best_mb, ["data.num_workers=0"]), "packed")
        if "bf16_grads" in words(args.extra):
            add(run_ours("ours_bf16_grads", model_dir, best_mb, ["megatron.grad_reduce_in_fp32=false"]), "packed")
        if "long" in words(args.extra):
            add(run_ours("ours_long", model_dir, best_mb, long_overrides), "long")
        for gpus in ints(args.gpus):
            add(run_ours(f"ours_ep{gpus}", model_dir, best_mb, [], gpus=gpus), "packed")
        for mb in ints(args.te_mb):
            if not te_imports():
                add({"name": "ours_te", "micro_batch_size": mb, "error": "transformer-engine does not import from "
                     f"MOE_TE_SITE={os.environ.get('MOE_TE_SITE')} (bench/te_install.sh)"}, "packed")
                break
            add(run_ours("ours_te", model_dir, mb, [], te=True), "packed")
        if args.lora_mb:
            base = lora_base(model_dir)
            for mb in ints(args.lora_mb):
                add(run_ours("ours_lora", model_dir, mb, ["model.lora.rank=16", f"megatron.dist_checkpointing_path={base}"]),
                    "packed")
        done_te = [r for r in rows if r["name"] == "ours_te" and "tokens_per_s" in r]
        te_mb = max(done_te, key=lambda r: r["tokens_per_s"])["micro_batch_size"] if done_te else None
        for piece in words(args.te_ablate) if done_te else []:
            add(run_ours(f"ours_te_plain_{piece}", model_dir, te_mb, [], plain=piece.replace("+", ","), te=True),
                "packed")
        if done_te and "long" in words(args.extra):
            add(run_ours("ours_te_long", model_dir, te_mb, long_overrides, te=True), "long")
        check_first_step(rows, entry)
        if args.profile:
            te = args.profile == "ours_te"
            mb = te_mb if te and done_te else best_mb
            profile = out_dir / f"{args.name}.{model}.{args.profile}.profile.json"
            row = run_ours(f"{args.profile}_profiled", model_dir, mb, [], profile=profile, te=te)
            if profile.exists():
                entry["profile"] = json.loads(profile.read_text())
            add(row, "packed")
        summary(model, rows)
    save()


def check_first_step(rows: list[dict], entry: dict) -> None:
    """End to end: the fused trainer's first step (same weights, same rows) gives the plain
    trainer's loss and gradient norm within bf16 tolerance."""
    fused = next((r for r in rows if r["name"] == "ours" and "loss_first" in r), None)
    plain = next((r for r in rows if r["name"] == "ours_plain" and "loss_first" in r), None)
    if not (fused and plain):
        return
    loss = abs(fused["loss_first"] - plain["loss_first"]) / plain["loss_first"]
    norm = abs(fused["grad_norm_first"] - plain["grad_norm_first"]) / plain["grad_norm_first"]
    entry["fused_vs_plain_first_step"] = {"loss_rel": loss, "grad_norm_rel": norm}
    assert loss < 1e-3 and norm < 1e-2, f"fused and plain first steps differ: loss {loss:.1e}, grad norm {norm:.1e}"


def summary(model: str, rows: list[dict]) -> None:
    best = lambda name: max((r for r in rows if r["name"] == name and "tokens_per_s" in r),  # noqa: E731
                            key=lambda r: r["tokens_per_s"], default=None)
    print(f"\n{model}")
    print(f"{'row':<28}{'mb':>4}{'tokens/s':>12}{'TFLOP/s':>10}{'MFU':>8}{'peak GiB':>10}{'planner':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['name']:<28}{r['micro_batch_size']:>4}  error: {r['error'][:120]}")
            continue
        print(f"{r['name']:<28}{r['micro_batch_size']:>4}{r['tokens_per_s']:>12,.0f}{r.get('tflops_per_gpu', 0):>10}"
              f"{r.get('mfu', 0):>8.1%}{r['peak_mem_gib']:>10}{r.get('planner_mem_gib', ''):>9}")
    ours, hf, te = best("ours"), best("hf"), best("ours_te")
    if ours and hf:
        print(f"best ours / best hf: {ours['tokens_per_s'] / hf['tokens_per_s']:.2f}x")
    if te and hf and ours:
        print(f"best ours_te / best hf: {te['tokens_per_s'] / hf['tokens_per_s']:.2f}x; "
              f"ours_te / ours: {te['tokens_per_s'] / ours['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
