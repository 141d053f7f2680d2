"""Per-step metrics: a line on rank 0's console and a JSON object in RUN_DIR/metrics.jsonl."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

# Peak dense bf16 matrix throughput per GPU, for MFU. Unknown GPUs (and the CPU) report none.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "B200": 2250.0}


def peak_tflops() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def flops_per_token(model_dims) -> float:
    """Training FLOPs per token: 6 x active parameters (forward and backward matmuls)."""
    return 6.0 * model_dims.active_params()


class MetricsLog:
    def __init__(self, run_dir: Path, enabled: bool, total_steps: int, tensorboard: bool = False):
        self.enabled = enabled
        self.total = total_steps
        self.path = run_dir / "metrics.jsonl"
        self.file = open(self.path, "a") if enabled else None
        self.writer = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                print("tensorboard is not installed; logging to metrics.jsonl only", file=sys.stderr)
        self.start = time.time()

    def log(self, record: dict, console: bool = True) -> None:
        if not self.enabled:
            return
        # which job and attempt wrote it: a run directory holds every submission of its recipe
        record = {**record, "job_id": os.environ.get("MOE_JOB_ID"), "restart": int(os.environ.get("MOE_RESTART") or 0),
                  "total_steps": self.total, "time": round(time.time(), 3)}  # progress for launcher status
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.writer.add_scalar(key, value, record["step"])
        if console:
            print(self.line(record), flush=True)

    def line(self, r: dict) -> str:
        done = r["step"] / max(self.total, 1)
        width = 20
        bar = "#" * int(done * width) + "-" * (width - int(done * width))
        elapsed = time.time() - self.start
        eta = elapsed / max(done, 1e-9) - elapsed if done > 0 else 0
        if "val_loss" in r and "loss" not in r:
            return f"[{bar}] step {r['step']}/{self.total} val_loss {r['val_loss']:.4f}"
        parts = [f"[{bar}] step {r['step']}/{self.total}", f"loss {r['loss']:.4f}", f"lr {r['lr']:.2e}",
                 f"grad_norm {r['grad_norm']:.3f}", f"{r['tokens_per_s']:.0f} tok/s"]
        if r.get("mfu") is not None:
            parts.append(f"mfu {r['mfu']:.1%}")
        parts.append(f"eta {eta:.0f}s")
        return " | ".join(parts)

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.writer:
            self.writer.close()
