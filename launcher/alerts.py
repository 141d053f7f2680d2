"""What engineers watch MoE runs for, per training step: a loss spike, a loss or gradient norm
that is not finite, an expert layer whose most loaded expert takes far more than its share.
The trainer checks every step (the thresholds are recipe keys) and writes what it finds into
the log and metrics.jsonl; `launcher status` and `launcher report` show them. No torch."""

from __future__ import annotations

import math
import statistics

WINDOW = 20  # steps whose median loss a spike is measured against


def step_alerts(record: dict, earlier_losses: list[float], spike: float, imbalance: float) -> list[str]:
    step, loss, norm = record["step"], record["loss"], record.get("grad_norm")
    if not math.isfinite(loss) or (norm is not None and not math.isfinite(norm)):
        return [f"step {step}: loss {loss}, gradient norm {norm}: not finite"]
    found = []
    recent = [x for x in earlier_losses[-WINDOW:] if math.isfinite(x)]
    if len(recent) >= 5 and loss > spike * statistics.median(recent):
        found.append(f"step {step}: loss spike, {loss:.4f} > {spike:g} x the median {statistics.median(recent):.4f} "
                     f"of the {len(recent)} steps before")
    for layer, counts in sorted((record.get("tokens_per_expert") or {}).items()):
        mean = sum(counts) / len(counts) if counts else 0
        if mean and max(counts) / mean > imbalance:
            found.append(f"step {step}: {layer}: expert {counts.index(max(counts))} took {max(counts) / mean:.1f} x "
                         f"the mean of its layer's tokens")
    return found
