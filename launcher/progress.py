"""How far a job is, from its run directory: the trainer's metrics.jsonl (its own records
only: a run directory holds every submission of its recipe), its checkpoints and its log.
Plain file reads, no torch: `launcher list` and `launcher status` call it for every job."""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional


@dataclass
class Progress:
    step: Optional[int] = None
    total_steps: Optional[int] = None
    loss: Optional[float] = None
    val_loss: Optional[float] = None
    tokens_per_s: Optional[float] = None
    elapsed_s: Optional[float] = None  # from the job's first logged step to its last
    eta_s: Optional[float] = None
    restarts: int = 0
    last_checkpoint: Optional[str] = None
    last_error: Optional[str] = None
    # torchrun's root cause of the last failed attempt: "rank 1 on host n2: exit code -9 (SIGKILL)"
    rank_failure: Optional[str] = None
    alerts: list = field(default_factory=list)  # the trainer's (launcher.alerts), the last 20

    def to_dict(self) -> dict:
        return asdict(self)


def read_progress(run_dir: str | Path, job_id: str, log_path: Optional[str] = None,
                  running: bool = True) -> Progress:
    run_dir = Path(run_dir)
    progress = Progress()
    records = read_records(run_dir / "metrics.jsonl", job_id)
    steps = [r for r in records if "loss" in r]
    if steps:
        last = steps[-1]
        recent = steps[-5:]
        progress.step, progress.total_steps, progress.loss = last["step"], last.get("total_steps"), last["loss"]
        progress.tokens_per_s = statistics.median(r["tokens_per_s"] for r in recent)
        progress.restarts = max(r.get("restart", 0) for r in steps)
        progress.alerts = [a for r in steps for a in r.get("alerts", [])][-20:]
        if "time" in steps[0]:
            progress.elapsed_s = (time.time() if running else last["time"]) - steps[0]["time"] + steps[0]["step_time_s"]
        if progress.total_steps and running:
            progress.eta_s = (progress.total_steps - progress.step) * statistics.median(r["step_time_s"] for r in recent)
    vals = [r for r in records if "val_loss" in r]
    progress.val_loss = vals[-1]["val_loss"] if vals else None
    progress.last_checkpoint = _latest_checkpoint(run_dir)
    tail = _log_tail(log_path)
    progress.last_error = _last_error(tail)
    progress.rank_failure = rank_failure(tail)
    return progress


def read_records(path: Path, job_id: str | None) -> list[dict]:
    """metrics.jsonl's records of one job (all of them for None); a half-written line is skipped."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # a line being written
    if job_id is None:
        return records
    own = [r for r in records if r.get("job_id") == job_id]
    # records without a job id come from runs outside the launcher (or from before it named them)
    return own or [r for r in records if r.get("job_id") is None]


def _latest_checkpoint(run_dir: Path) -> Optional[str]:
    """`latest` of the checkpoint folder the job's recipe names (default RUN_DIR/checkpoints)."""
    folder = run_dir / "checkpoints"
    recipe = run_dir / "recipe.yaml"
    if recipe.exists():
        import yaml

        try:
            named = (yaml.safe_load(recipe.read_text()) or {}).get("trainer", {}).get("default_local_dir")
        except yaml.YAMLError:
            named = None
        folder = Path(named) if named else folder
    try:
        return str(folder / (folder / "latest").read_text().strip())
    except OSError:
        return None


def _log_tail(log_path: Optional[str]) -> str:
    if not log_path or not Path(log_path).exists():
        return ""
    with open(log_path, "rb") as f:
        f.seek(0, 2)
        f.seek(max(0, f.tell() - 256 * 1024))
        return f.read().decode(errors="replace")


def _last_error(tail: str) -> Optional[str]:
    """The trainer's last `error:` line (the reason a job failed), from the end of its log."""
    errors = [line.strip() for line in tail.splitlines() if line.strip().startswith("error: ")]
    return errors[-1][len("error: "):] if errors else None


def rank_failure(tail: str) -> Optional[str]:
    """The rank, host and exit code of the first failure torchrun reported ("Root Cause (first
    observed failure)") in the last attempt that had one: each node's torchrun reports its own,
    and the earliest is the rank that died, not one that lost its peer after it."""
    import re
    import signal

    attempts = re.split(r"^(?==== moe-launcher job \S+ restart \d+ )", tail, flags=re.M)
    failed = [a for a in attempts if "Root Cause (first observed failure)" in a]
    if not failed:
        return None
    attempt = failed[-1]
    reports = []
    for block in attempt.split("Root Cause (first observed failure)")[1:]:
        fields = dict(re.findall(r"^\s*(time|host|rank|exitcode)\s*:\s*(.+?)\s*$", block[:2000], re.M))
        if "rank" in fields:
            reports.append(fields)
    if not reports:
        return None
    first = min(reports, key=lambda f: f.get("time", ""))
    text = f"rank {first['rank'].split(' (')[0]} on host {first.get('host', '?')}"
    code = first.get("exitcode", "").split(" (")[0]
    if code:
        text += f": exit code {code}"
        if code.startswith("-") and code[1:].isdigit():
            try:
                text += f" ({signal.Signals(int(code[1:])).name})"
            except ValueError:
                pass
    header = re.match(r"=== moe-launcher job \S+ restart (\d+) ", attempt)
    return text + (f", attempt {header.group(1)}" if header else "")


def duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"
