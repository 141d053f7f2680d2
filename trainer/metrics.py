"""Per-step metrics: a line on rank 0's console and a JSON object in RUN_DIR/metrics.jsonl."""

from __future__ import annotations

import json
import math
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


class InFlight:
    """A step's numbers that live on the GPU (loss sums, routed tokens, the MoE and MTP losses, the
    gradient norm), copied to the host without waiting: one tensor into pinned memory, and an event. The loop
    reads them a step later, while the GPU runs the next step. Reading them at once made the
    host wait for the step's last kernel, and the GPU then idled while the host logged, fetched
    and collated the next rows and launched their first kernels (bench/README.md)."""

    def __init__(self, parts: dict, **known):
        import torch

        self.known = known  # what the host already holds: step, timings, learning rate...
        self.absent = [name for name, value in parts.items() if value is None]
        present = {name: value for name, value in parts.items() if value is not None}
        self.shapes = {name: tuple(value.shape) for name, value in present.items()}
        flat = torch.cat([value.reshape(-1).double() for value in present.values()])
        self.ready = None
        if flat.is_cuda:
            self.host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
            self.host.copy_(flat, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record()
        else:
            self.host = flat

    def read(self) -> dict:
        """The known values and the device ones (as lists, or None where absent), once copied."""
        if self.ready is not None:
            self.ready.synchronize()
        values, at = {**self.known, **dict.fromkeys(self.absent)}, 0
        for name, shape in self.shapes.items():
            size = math.prod(shape)
            values[name] = self.host[at:at + size].reshape(shape).tolist()
            at += size
        return values
