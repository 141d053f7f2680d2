"""Summarise bench/gpu_trainer.sh's metrics: median tokens/s and peak memory after warm-up."""

import json
import statistics
import sys
from pathlib import Path

out = Path(sys.argv[1])
summary = {"gpu": (out / "gpu.txt").read_text().strip().splitlines() if (out / "gpu.txt").exists() else None}
for path in sorted(out.glob("*.metrics.jsonl")):
    steps = [json.loads(line) for line in path.read_text().splitlines()]
    steps = [s for s in steps if "loss" in s]
    steady = steps[2:] or steps  # the first steps include compilation and allocator warm-up
    summary[path.name.split(".")[0]] = {
        "steps": len(steps),
        "tokens_per_s_median": round(statistics.median(s["tokens_per_s"] for s in steady), 1),
        "step_time_s_median": round(statistics.median(s["step_time_s"] for s in steady), 3),
        "tflops_per_gpu_median": round(statistics.median(s["tflops_per_gpu"] for s in steady), 2),
        "mfu_median": (round(statistics.median(s["mfu"] for s in steady), 4) if steady[0].get("mfu") else None),
        "peak_memory_gib": round(max(s.get("peak_memory_gib", 0) for s in steps), 2),
        "loss_first_last": [round(steps[0]["loss"], 4), round(steps[-1]["loss"], 4)],
    }
print(json.dumps(summary, indent=1))
