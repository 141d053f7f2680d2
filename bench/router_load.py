"""How even a router's load becomes as it trains, and what that does to expert-parallel speed.

    python3 bench/router_load.py NAME [--gpus 4] [--steps 120] [--runs text,text@0.01,words] [--te]
                                      [--plain KERNELS] [--profile]

The layout benchmark's router rows start from an untrained router on the benchmark's filler text
(fifteen words repeated), and the busiest expert-parallel rank gets twice an even share under
EP=4 (`expert_parallel_load` in metrics.jsonl). This trains `qwen3_moe_8l` with its own router
(dropless, the all-gather dispatcher, EP = --gpus, micro-batch 8) for --steps steps and keeps every
step's `expert_parallel_load`, tokens/s per GPU and loss. Each run names its data and, after
`@`, the auxiliary load-balancing loss coefficient (default: the model's config, 0.001):
`words` is the filler text; `text` is prose and code, the Markdown and Python files of this
repository and of the installed megatron-core, cut into samples longer than 4096 tokens.
--te runs transformer-engine's path (MOE_TE_SITE, bench/te_install.sh); --plain turns fused pieces
off (MOE_PLAIN_KERNELS); --profile profiles each run's last two steps (trainer/profile.py) into
NAME-RUN-profile.json beside the result. A step's time runs from its start on the host to the next
step's, so a host wait can move time from one step to the next: `last_20` gives the median step
and the time-weighted rate (all tokens over all time). Writes $OUT/NAME.json (or bench/out/NAME.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import gpu_speed  # noqa: E402
import layouts  # noqa: E402

SAMPLE_CHARS = 6000  # above 4096 tokens of the stand-in tokenizer (about 0.8 tokens a character)


def text_samples(path: Path) -> Path:
    """A parquet file of prompt/response rows cut from real prose and code, in a fixed order."""
    import megatron.core
    import pyarrow as pa
    import pyarrow.parquet as pq

    roots = [REPO, Path(megatron.core.__file__).parent]
    files = sorted(f for root in roots for pattern in ("*.md", "*.py") for f in root.rglob(pattern))
    text = "\n\n".join(f.read_text(errors="replace") for f in files)
    chunks = [text[i:i + SAMPLE_CHARS] for i in range(0, len(text) - SAMPLE_CHARS, SAMPLE_CHARS)]
    pq.write_table(pa.table({"prompt": [c[:1000] for c in chunks], "response": [c[1000:] for c in chunks]}), path)
    return path


def train(name: str, data: str, aux: float | None, gpus: int, te: bool, plain: str, profile: Path | None) -> dict:
    layout = layouts.layout_overrides(f"ep{gpus}+allgather")
    if aux is not None:
        layout.append(f"model.override_config.moe_config.aux_loss_coeff={aux}")
    overrides = layouts.recipe_overrides(gpus, 8, layout, data)
    row = gpu_speed.run_ours(name, layouts.MODEL, 8, overrides[1:], plain=plain, profile=profile, gpus=gpus, te=te)
    metrics = Path("/tmp/bench-speed") / f"{name}-mb8" / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    logged = [r for r in records if "loss" in r]  # the training steps' records
    row["steps"] = [{"step": i + 1, "expert_parallel_load": r.get("expert_parallel_load"),
                     "tokens_per_s": round(r["tokens_per_s"] / gpus, 1), "loss": r["loss"],
                     "moe_aux_loss": r.get("moe_aux_loss"), "step_time_s": r["step_time_s"],
                     "alloc_retries": r.get("alloc_retries"), "gc_pause_s": r.get("gc_pause_s")}
                    for i, r in enumerate(logged)]
    for step, record in zip(row["steps"][-4:], logged[-4:]):  # the tokens each expert got, per layer
        step["tokens_per_expert"] = record.get("tokens_per_expert")
    last = row["steps"][-20:]
    row["last_20"] = {"expert_parallel_load": statistics.median(s["expert_parallel_load"] for s in last),
                      "tokens_per_s": statistics.median(s["tokens_per_s"] for s in last),
                      "tokens_per_s_time_weighted": round(sum(s["tokens_per_s"] * s["step_time_s"] for s in last)
                                                          / sum(s["step_time_s"] for s in last), 1)}
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("name")
    parser.add_argument("--gpus", type=int, default=4)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--runs", default="words,text,text@0.01")
    parser.add_argument("--te", action="store_true")
    parser.add_argument("--plain", default="")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    gpu_speed.STEPS = args.steps
    files = {"words": gpu_speed.long_samples(Path("/tmp/bench-long.parquet")),
             "text": text_samples(Path("/tmp/bench-text.parquet"))}
    out = Path(os.environ.get("OUT", REPO / "bench" / "out"))
    out.mkdir(parents=True, exist_ok=True)
    result = {"versions": gpu_speed.versions(), "transformer_engine": args.te, "plain_kernels": args.plain,
              "model": "bench/models/qwen3_moe_8l",
              "gpus": args.gpus, "micro_batch_size": 8, "rows_per_gpu": layouts.ROWS_PER_GPU, "runs": []}
    for run in args.runs.split(","):
        data, _, aux = run.partition("@")
        name = f"{data}-aux{aux or 'model'}"
        profile = out / f"{args.name}-{name}-profile.json" if args.profile else None
        row = train(name, str(files[data]), float(aux) if aux else None, args.gpus, args.te, args.plain, profile)
        row.update(data=data, aux_loss_coeff=float(aux) if aux else "model config (0.001)")
        result["runs"].append(row)
        print(json.dumps({"run": run, "first": row["steps"][0], "last_20": row["last_20"]}), flush=True)
        (out / f"{args.name}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
