"""Measured tokens/s of parallel layouts against the layout search's estimates.

On a GPU machine (several GPUs of one host):

    python3 bench/layouts.py run NAME --gpus 2 --layouts ep2,pp2,tp2,tp2-etp2,cp2 --calibrate 2,4,8

runs `qwen3_moe_8l` on one GPU at the --calibrate micro-batch sizes and on --gpus GPUs in each
layout (tp/etp/ep/pp/cp/vpp and a size, joined by '-'; ETP defaults to 1; `@N` after a layout
runs it on N GPUs instead; `+VARIANT` after the sizes adds one of VARIANTS: `ep2+overlap@2`),
8 rows of 4096 tokens per GPU a step, one long sample per row (the attention work the estimate
assumes), and writes the measurements to $OUT/NAME.json. A second
`run` of the same NAME on the same machine adds its rows to the first's (kept in /tmp), so one
machine's rows can span several calls. Then, on any machine:

    python3 bench/layouts.py compare bench/results/NAME.json

fits the speed model's two measured constants (mfu, layer_overhead_ms) to the one-GPU rows only,
estimates every multi-GPU row with `launcher.plan.speed`, and writes NAME_check.json beside it:
the measured and estimated order and each estimate's error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MODEL = REPO / "bench" / "models" / "qwen3_moe_8l"
ROWS_PER_GPU = 8


# Options measured beside a layout: recipe overrides, and trainer pieces turned off (MOE_PLAIN_KERNELS).
BALANCED = "model.override_config.moe_config.force_load_balancing=true"
ALLGATHER = "model.override_config.moe_config.token_dispatcher=allgather"


def padded(capacity: float) -> list[str]:
    """Each expert padded to `capacity` x its even share (tokens beyond it dropped): no host wait."""
    moe = "model.override_config.moe_config"
    return [f"{moe}.capacity_factor={capacity}", f"{moe}.pad_to_capacity=true"]

VARIANTS = {
    "": ([], ""),  # the layout as it is
    "overlap": (["megatron.overlap_grad_reduce=true", "megatron.overlap_param_gather=true"], ""),
    "allgather": ([ALLGATHER], ""),
    "balanced_allgather": ([BALANCED, ALLGATHER], ""),
    "plain_grad_add": ([], "grad_add"),
    # random experts in equal numbers: the exchange's cost without this router's imbalance
    "balanced": ([BALANCED], ""),
    "balanced_overlap": ([BALANCED, "megatron.overlap_grad_reduce=true", "megatron.overlap_param_gather=true"], ""),
    "balanced_grad_overlap": ([BALANCED, "megatron.overlap_grad_reduce=true"], ""),
    # 500M-parameter buckets (megatron-core's default: 40M)
    "balanced_grad_overlap_big": ([BALANCED, "megatron.overlap_grad_reduce=true", "megatron.ddp_bucket_size=500000000"], ""),
    "grad_overlap_big": (["megatron.overlap_grad_reduce=true", "megatron.ddp_bucket_size=500000000"], ""),
    "balanced_pad": ([BALANCED, *padded(1.0)], ""),
    "balanced_pad125": ([BALANCED, *padded(1.25)], ""),
    "pad125": (padded(1.25), ""),
    "pad": (padded(1.0), ""),
    # the all-gather dispatcher, padded: each token once to every rank instead of once per routed copy
    "balanced_pad_allgather": ([BALANCED, *padded(1.0), ALLGATHER], ""),
    "pad_allgather": ([*padded(1.0), ALLGATHER], ""),
    "a2a_overlap": (["megatron.overlap_moe_expert_parallel_comm=true"], ""),
    "balanced_a2a_overlap": ([BALANCED, "megatron.overlap_moe_expert_parallel_comm=true"], ""),
}


def layout_overrides(spec: str) -> list[str]:
    spec, _, variant = spec.partition("+")
    spec = "ep1" if spec == "single" else spec
    sizes = {"tp": 1, "etp": 1, "ep": 1, "pp": 1, "cp": 1, "vpp": 1}
    for part in spec.split("-"):
        key = part.rstrip("0123456789")
        sizes[key] = int(part[len(key):])
    m = "megatron."
    return [f"{m}tensor_model_parallel_size={sizes['tp']}", f"{m}expert_tensor_parallel_size={sizes['etp']}",
            f"{m}expert_model_parallel_size={sizes['ep']}", f"{m}pipeline_model_parallel_size={sizes['pp']}",
            f"{m}context_parallel_size={sizes['cp']}", f"{m}sequence_parallel={str(sizes['tp'] > 1).lower()}",
            f"{m}virtual_pipeline_model_parallel_size={sizes['vpp'] if sizes['vpp'] > 1 else 'null'}",
            *VARIANTS[variant][0]]


def recipe_overrides(gpus: int, mb: int, layout: list[str], data_file: str) -> list[str]:
    return [f"model.path={MODEL}", f"trainer.n_gpus_per_node={gpus}", f"data.micro_batch_size={mb}",
            f"data.global_batch_size={ROWS_PER_GPU * gpus}", f"data.train_files={data_file}",
            "data.truncation=right", *layout]


def run(args) -> None:
    import gpu_speed
    import torch

    out = Path(os.environ.get("OUT", REPO / "bench" / "out"))
    out.mkdir(parents=True, exist_ok=True)
    kept = Path("/tmp/bench-layouts") / f"{args.name}.json"  # this machine's rows of earlier calls
    kept.parent.mkdir(exist_ok=True)
    gpu_speed.STEPS = args.steps
    data = str(gpu_speed.long_samples(Path("/tmp/bench-long.parquet")))
    result = json.loads(kept.read_text()) if kept.exists() else {
        "device": f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}, one host",
        "versions": gpu_speed.versions(), "model": "bench/models/qwen3_moe_8l", "sequence": 4096,
        "rows_per_gpu": ROWS_PER_GPU, "data": "one long sample per row (data.truncation=right)",
        "transformer_engine": args.te, "rows": []}
    plan = [(1, mb, "single") for mb in map(int, args.calibrate.split(",") if args.calibrate else [])]
    for entry in filter(None, args.layouts.split(",")):
        spec, _, gpus = entry.partition("@")
        plan.append((int(gpus or args.gpus), args.mb, spec))
    for gpus, mb, spec in plan:
        layout = layout_overrides(spec)
        # run_ours puts its own batch and EP first; ours come after and win
        overrides = recipe_overrides(gpus, mb, layout, data)
        profile = out / f"{args.name}.{spec.replace('+', '_')}-g{gpus}.profile.json" if f"{spec}@{gpus}" == args.profile else None
        plain = VARIANTS[spec.partition("+")[2]][1]
        row = gpu_speed.run_ours(f"{spec}-g{gpus}", MODEL, mb, overrides[1:], plain=plain, gpus=gpus, profile=profile,
                                 te=args.te)
        row.update(layout=spec, recipe_overrides=overrides)
        if profile is None:  # a profiled run is slower: its row stays out of the comparison
            result["rows"].append(row)
        print(json.dumps({k: row.get(k) for k in ("layout", "gpus", "micro_batch_size", "tokens_per_s",
                                                 "peak_mem_gib", "error")}), flush=True)
        kept.write_text(json.dumps(result, indent=1))
        (out / f"{args.name}.json").write_text(kept.read_text())


_PLANS: dict = {}


def estimate(row: dict, gpus_per_node: int, gpu_type: str, fitted: dict, te: bool = False) -> dict:
    from launcher.cluster import Cluster, HardwareSection
    from launcher.plan.layout import plan_layout
    from launcher.plan.models import read_model
    from launcher.plan.speed import ROUTED_LOAD, estimate_speed, hardware
    from launcher.recipe import load_recipe

    key = tuple(row["recipe_overrides"])
    if key not in _PLANS:
        recipe = load_recipe(REPO / "bench" / "qwen3_moe_mid.yaml", row["recipe_overrides"])
        model = read_model(recipe.model.path)
        _PLANS[key] = recipe, model, plan_layout(recipe, model, gpus_per_node)
    recipe, model, layout = _PLANS[key]
    cluster = Cluster(name="bench", backend="local", gpu_type=gpu_type, hardware=HardwareSection(transformer_engine=te))
    hw = dataclasses.replace(hardware(cluster), **fitted)
    load = row.get("expert_parallel_load") or ROUTED_LOAD  # the trainer's, where the row recorded it
    speed = estimate_speed(recipe, model, layout, hw, gpus_per_node, routed_load=load)
    return {"tokens_per_s_per_gpu": round(speed.tokens_per_s_per_gpu, 1), "bottleneck": speed.bottleneck,
            "parts_s": speed.parts}


def fit(groups: list[tuple[list[dict], int, str, dict, bool]], grid: dict) -> dict:
    """The grid point (every combination of grid's values) with the least squared relative error
    over the groups' rows; a group is (rows, GPUs per node, GPU type, the constants fixed for it,
    whether they ran transformer-engine)."""
    import itertools

    best, best_error = None, None
    for values in itertools.product(*grid.values()):
        point = dict(zip(grid, values))
        error = sum((estimate(r, gpus, gpu_type, {**fixed, **point}, te)["tokens_per_s_per_gpu"] / r["tokens_per_s"]
                     - 1) ** 2 for rows, gpus, gpu_type, fixed, te in groups for r in rows)
        if best_error is None or error < best_error:
            best, best_error = point, error
    return best


def repeats_averaged(rows: list[dict]) -> list[dict]:
    """One row per layout, GPU count and micro-batch size: repeated runs' mean tokens/s, with
    each run's figure kept (they spread by up to ~10% on one machine: bench/README.md)."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["layout"], r["gpus"], r["micro_batch_size"]), []).append(r)
    averaged = []
    for runs in groups.values():
        row = dict(runs[0])
        if len(runs) > 1:
            row["runs_tokens_per_s"] = [r["tokens_per_s"] for r in runs]
            row["tokens_per_s"] = round(sum(row["runs_tokens_per_s"]) / len(runs), 1)
        averaged.append(row)
    return averaged


def pairs_out_of_order(rows: list[dict]) -> list[str]:
    """Each pair of layouts that the estimate ranks the other way round from the measurement,
    with how far apart they measured."""
    out = []
    for i, a in enumerate(rows):
        for b in rows[i + 1:]:
            measured = a["measured_tokens_per_s_per_gpu"] - b["measured_tokens_per_s_per_gpu"]
            estimated = a["estimated_tokens_per_s_per_gpu"] - b["estimated_tokens_per_s_per_gpu"]
            if measured * estimated < 0:
                faster, slower = (a, b) if measured > 0 else (b, a)
                gap = faster["measured_tokens_per_s_per_gpu"] / slower["measured_tokens_per_s_per_gpu"] - 1
                out.append(f"{faster['layout']} > {slower['layout']} by {gap:.1%}")
    return out


def compare(args) -> None:
    """For each results file (one machine each), the matmul utilisation and host time per layer
    fitted on its one-GPU rows; the collective and EP sync times fitted once on the multi-GPU rows
    of all TE-free files together, and again leaving each file out (its rows then predicted, not
    fitted); for files run with transformer-engine, its `mfu` on their one-GPU rows and the time
    of its context-parallel ring on their multi-GPU rows, the collectives as fitted TE-free."""
    files = [(Path(f), json.loads(Path(f).read_text())) for f in args.results]
    machines = []
    for path, result in files:
        rows = repeats_averaged([r for r in result["rows"] if "tokens_per_s" in r])
        gpu_type = result["device"].split(" x ", 1)[1]
        gpus = max(r["gpus"] for r in rows)
        te = bool(result.get("transformer_engine"))
        singles = [r for r in rows if r["gpus"] == 1]
        grid = {"mfu": [m / 100 for m in range(10, 71)]}
        if len({r["micro_batch_size"] for r in singles}) > 1:  # one size: the host time stays the table's
            grid["layer_overhead_ms"] = [o / 4 for o in range(0, 41)]
        single = fit([(singles, gpus, gpu_type, {}, te)], grid)
        machines.append({"path": path, "result": result, "rows": rows, "gpu_type": gpu_type, "gpus": gpus,
                         "single": single, "te": te})

    def fit_collectives(chosen):
        chosen = [m for m in chosen if m["gpus"] > 1 and not m["te"]]
        if not chosen:
            return None
        return fit([([r for r in m["rows"] if r["gpus"] > 1], m["gpus"], m["gpu_type"], m["single"], False)
                    for m in chosen],
                   {"collective_ms": [c / 10 for c in range(0, 41)], "ep_sync_ms": [e / 2 for e in range(0, 25)]})

    joint = fit_collectives(machines)
    te_machines = [m for m in machines if m["te"] and m["gpus"] > 1]
    te_ring = fit([([r for r in m["rows"] if r["gpus"] > 1], m["gpus"], m["gpu_type"], {**m["single"], **joint}, True)
                   for m in te_machines], {"te_cp_ring_ms": [t / 4 for t in range(0, 41)]}) if te_machines else {}
    check = {"fitted_collectives_on_all": joint, "fitted_te_ring": te_ring, "machines": []}
    for m in machines:
        held_out = fit_collectives([o for o in machines if o is not m]) if len(machines) > 1 else None
        if m["te"]:  # the collectives never came from its rows: as fitted is as predicted
            held_out = None
        entry = {"source": m["path"].name, "device": m["result"]["device"], "transformer_engine": m["te"],
                 "fitted_on_one_gpu": m["single"],
                 "collectives_fitted_without_this_machine": held_out, "rows": []}
        for label, collectives in [("fitted", joint), ("predicted", held_out)]:
            if collectives is None:
                continue
            point = {**m["single"], **collectives, **(te_ring if m["te"] else {})}
            for r in m["rows"]:
                est = estimate(r, m["gpus"], m["gpu_type"], point, m["te"])
                entry["rows"].append({"constants": label, "layout": r["layout"], "gpus": r["gpus"],
                                      "micro_batch_size": r["micro_batch_size"],
                                      "measured_tokens_per_s_per_gpu": r["tokens_per_s"],
                                      "estimated_tokens_per_s_per_gpu": est["tokens_per_s_per_gpu"],
                                      "error": round(est["tokens_per_s_per_gpu"] / r["tokens_per_s"] - 1, 3),
                                      "bottleneck": est["bottleneck"], "estimate_parts_s": est["parts_s"]})
            multi = [c for c in entry["rows"] if c["constants"] == label and c["gpus"] > 1]
            if not multi:  # a machine of one GPU: its rows fit mfu and host time only
                continue
            entry[label] = {"worst_error": max(abs(c["error"]) for c in multi), "gpus": {}}
            for gpus in sorted({c["gpus"] for c in multi}):  # the search ranks layouts of one GPU count
                same = [c for c in multi if c["gpus"] == gpus]
                order = {key: [c["layout"] for c in sorted(same, key=lambda c: -c[f"{key}_tokens_per_s_per_gpu"])]
                         for key in ("measured", "estimated")}
                entry[label]["gpus"][gpus] = {"order_measured": order["measured"],
                                              "order_estimated": order["estimated"],
                                              "same_order": order["measured"] == order["estimated"],
                                              "pairs_out_of_order": pairs_out_of_order(same)}
        check["machines"].append(entry)
        print(f"{entry['source']} ({entry['device']}): one GPU {m['single']}")
        for c in entry["rows"]:
            print(f"  {c['constants']:>9} {c['layout']:>10} x{c['gpus']} mb{c['micro_batch_size']}: measured "
                  f"{c['measured_tokens_per_s_per_gpu']:>9,.0f}  estimated {c['estimated_tokens_per_s_per_gpu']:>9,.0f}"
                  f"  ({c['error']:+.0%}, {c['bottleneck']})")
        for label in ("fitted", "predicted"):
            if label in entry:
                for gpus, e in entry[label]["gpus"].items():
                    n = len(e["order_measured"])
                    print(f"  {label} x{gpus}: measured {' > '.join(e['order_measured'])}; estimated "
                          f"{' > '.join(e['order_estimated'])}; {n * (n - 1) // 2 - len(e['pairs_out_of_order'])} of "
                          f"{n * (n - 1) // 2} pairs in order, out: {e['pairs_out_of_order']}")
                print(f"  {label}: worst error {entry[label]['worst_error']:.0%}")
    print("collectives fitted on all:", joint, "; transformer-engine's ring:", te_ring)
    out = Path(args.output)
    out.write_text(json.dumps(check, indent=1))
    print("wrote", out)


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run")
    p.add_argument("name")
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--layouts", default="ep2,pp2,tp2,tp2-etp2,cp2")
    p.add_argument("--calibrate", default="2,4,8", help="one-GPU micro-batch sizes")
    p.add_argument("--mb", type=int, default=4, help="micro-batch size of the multi-GPU layouts")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--profile", default="", metavar="LAYOUT@N", help="also profile this layout (a run of its own)")
    p.add_argument("--te", action="store_true", help="with transformer-engine (MOE_TE_SITE, bench/te_install.sh)")
    p = sub.add_parser("compare")
    p.add_argument("results", nargs="+", help="results files of `run`, one per machine")
    p.add_argument("-o", "--output", default=str(REPO / "bench" / "results" / "layouts_check.json"))
    args = parser.parse_args()
    {"run": run, "compare": compare}[args.command](args)


if __name__ == "__main__":
    main()
