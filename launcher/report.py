"""`launcher report`: a run's metrics.jsonl as pictures and a summary a user reads at a glance.

Writes into OUT (default RUN_DIR/report/): loss.png (training and validation loss),
optimizer.png (learning rate and gradient norm), throughput.png (tokens/s and MFU),
expert_share.png (per MoE layer, the share of tokens routed to each expert over the steps),
expert_imbalance.png (most loaded expert / mean, per layer), aux_loss.png, summary.md and
report.html (the plots and the summary on one page), with the run's alerts (launcher.alerts).
Every record of a step trained more than once (a restart) counts once: its last. Needs
matplotlib (the `report` extra), never torch.
"""

from __future__ import annotations

import html
import math
import statistics
from dataclasses import dataclass
from pathlib import Path



@dataclass
class Run:
    steps: list[dict]  # one record per step, in order
    val: list[dict]

    @classmethod
    def read(cls, metrics: Path, job_id: str | None = None) -> "Run":
        from launcher.progress import read_records

        by_step, val = {}, {}
        records = read_records(metrics, job_id)
        for r in records:
            if "loss" in r:
                by_step[r["step"]] = r
            elif "val_loss" in r:
                val[r["step"]] = r
        return cls([by_step[s] for s in sorted(by_step)], [val[s] for s in sorted(val)])

    def layers(self) -> list[str]:
        names = {name for r in self.steps for name in (r.get("tokens_per_expert") or {})}
        return sorted(names, key=lambda n: int(n.split("_")[1]))

    def expert_totals(self, layer: str) -> list[int]:
        rows = [r["tokens_per_expert"][layer] for r in self.steps if layer in (r.get("tokens_per_expert") or {})]
        return [sum(col) for col in zip(*rows)] if rows else []


def imbalance(counts: list[float]) -> float:
    mean = sum(counts) / len(counts) if counts else 0
    return max(counts) / mean if mean else math.nan


def alerts(run: Run, spike: float = 3.0, imbalance_limit: float = 4.0) -> list[str]:
    """The alerts the trainer recorded at each step (launcher.alerts), or, for records written
    before it did, the same checks made here."""
    from launcher.alerts import step_alerts

    found, losses = [], []
    for r in run.steps:
        found += r["alerts"] if "alerts" in r else step_alerts(r, losses, spike, imbalance_limit)
        losses.append(r["loss"])
    return found


def summary(run: Run, title: str, found_alerts: list[str]) -> str:
    steps = run.steps
    losses = [r["loss"] for r in steps]
    lines = [f"# {title}", "", "| | |", "| --- | --- |",
             f"| steps | {steps[0]['step']} to {steps[-1]['step']} ({len(steps)}) |",
             f"| final loss | {losses[-1]:.4f} |",
             f"| best loss | {min(losses):.4f} (step {steps[losses.index(min(losses))]['step']}) |"]
    if run.val:
        vals = [r["val_loss"] for r in run.val]
        lines.append(f"| final validation loss | {vals[-1]:.4f} (step {run.val[-1]['step']}) |")
        lines.append(f"| best validation loss | {min(vals):.4f} |")
    speeds = [r["tokens_per_s"] for r in steps[1:] or steps]  # the first step compiles and warms up
    lines.append(f"| tokens/s (median) | {statistics.median(speeds):,.0f} |")
    mfu = [r["mfu"] for r in steps[1:] if r.get("mfu") is not None]
    if mfu:
        lines.append(f"| MFU (median) | {statistics.median(mfu):.1%} |")
    peaks = [r["peak_memory_gib"] for r in steps if r.get("peak_memory_gib") is not None]
    if peaks:
        lines.append(f"| peak memory | {max(peaks):.1f} GiB |")
    loads = [r["expert_parallel_load"] for r in steps if r.get("expert_parallel_load") is not None]
    if loads:
        lines.append(f"| expert-parallel load, busiest rank / mean (median) | {statistics.median(loads):.2f} |")
    layers = run.layers()
    if layers:
        lines += ["", "## Experts (tokens routed over the run)", "",
                  "| layer | most loaded (tokens) | least loaded (tokens) | most / mean |", "| --- | --- | --- | --- |"]
        for layer in layers:
            totals = run.expert_totals(layer)
            top, low = max(range(len(totals)), key=totals.__getitem__), min(range(len(totals)), key=totals.__getitem__)
            lines.append(f"| {layer} | expert {top} ({totals[top]:,}) | expert {low} ({totals[low]:,}) | "
                         f"{imbalance(totals):.2f} |")
    lines += ["", "## Alerts", ""] + ([f"- {a}" for a in found_alerts] or ["none"])
    return "\n".join(lines) + "\n"


def write(run: Run, out: Path, title: str, found_alerts: list[str]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    steps = [r["step"] for r in run.steps]
    written = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(out / name)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(steps, [r["loss"] for r in run.steps], label="training loss")
    if run.val:
        ax.plot([r["step"] for r in run.val], [r["val_loss"] for r in run.val], "o-", label="validation loss")
    ax.set(title=f"Loss: {title}", xlabel="step", ylabel="loss (nats per response token)")
    ax.legend()
    ax.grid(alpha=0.3)
    save(fig, "loss.png")

    fig, (lr, gn) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    lr.plot(steps, [r["lr"] for r in run.steps])
    lr.set(title="Learning rate and gradient norm", ylabel="learning rate")
    gn.plot(steps, [r["grad_norm"] for r in run.steps], color="tab:red")
    gn.set(xlabel="step", ylabel="gradient norm (before clipping)")
    for a in (lr, gn):
        a.grid(alpha=0.3)
    save(fig, "optimizer.png")

    fig, speed = plt.subplots(figsize=(8, 4.5))
    speed.plot(steps, [r["tokens_per_s"] for r in run.steps], label="tokens/s")
    speed.set(title="Throughput (the whole job)", xlabel="step", ylabel="tokens per second")
    speed.grid(alpha=0.3)
    if any(r.get("mfu") is not None for r in run.steps):
        mfu = speed.twinx()
        mfu.plot(steps, [100 * (r.get("mfu") or 0) for r in run.steps], color="tab:green", label="MFU")
        mfu.set_ylabel("MFU (% of the GPU's bf16 peak)")
    save(fig, "throughput.png")

    layers = run.layers()
    if layers:
        cols = min(4, len(layers))
        rows = math.ceil(len(layers) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
        for ax, layer in zip(axes.flat, layers):
            grid = [[c / max(sum(r["tokens_per_expert"][layer]), 1) for c in r["tokens_per_expert"][layer]]
                    for r in run.steps if layer in (r.get("tokens_per_expert") or {})]
            image = ax.imshow(list(zip(*grid)), aspect="auto", origin="lower", cmap="viridis",
                              extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, len(grid[0]) - 0.5))
            ax.set(title=f"MoE {layer.replace('_', ' ')}", xlabel="step", ylabel="expert")
            fig.colorbar(image, ax=ax, label="share of tokens")
        for ax in list(axes.flat)[len(layers):]:
            ax.axis("off")
        fig.suptitle("Share of routed tokens per expert")
        save(fig, "expert_share.png")

        fig, ax = plt.subplots(figsize=(8, 4.5))
        for layer in layers:
            ax.plot([r["step"] for r in run.steps if layer in (r.get("tokens_per_expert") or {})],
                    [imbalance(r["tokens_per_expert"][layer]) for r in run.steps
                     if layer in (r.get("tokens_per_expert") or {})], label=layer.replace("_", " "))
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set(title="Expert load imbalance per step", xlabel="step", ylabel="most loaded expert / mean (1 = even)")
        ax.legend(fontsize="small", ncol=2)
        ax.grid(alpha=0.3)
        save(fig, "expert_imbalance.png")

    aux = [(r["step"], r["moe_aux_loss"]) for r in run.steps if r.get("moe_aux_loss") is not None]
    if aux:
        fig, ax = plt.subplots(figsize=(8, 4))
        ax.plot(*zip(*aux))
        ax.set(title="MoE load-balancing (aux) loss", xlabel="step", ylabel="aux loss (mean over layers)")
        ax.grid(alpha=0.3)
        save(fig, "aux_loss.png")

    text = summary(run, title, found_alerts)
    (out / "summary.md").write_text(text)
    pictures = "".join(f'<figure><img src="{p.name}" alt="{p.stem}"></figure>' for p in written)
    (out / "report.html").write_text(
        "<!doctype html><meta charset='utf-8'><title>" + html.escape(title) + "</title>"
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}img{max-width:100%}"
        "pre{background:#f4f4f4;padding:1em}</style>"
        f"<h1>{html.escape(title)}</h1><pre>{html.escape(text)}</pre>{pictures}\n")
    return [*written, out / "summary.md", out / "report.html"]
