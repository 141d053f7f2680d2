"""Where a step's time goes: a torch profile of the last two training steps, summarised by
kernel group (matmul, attention, elementwise, communication, optimizer, copy), with the host's
busiest operators, what made it wait on the GPU, and where the GPU sat idle waiting for the host
(the gaps between kernels, by the code that launched the kernel after each). Turned on with MOE_TORCH_PROFILE=FILE.json
(the benchmark does; MOE_TORCH_PROFILE_STACKS=1 adds the Python stack of each wait, and
torch's sync debug warnings counted by stack); rank 0
writes the summary."""

from __future__ import annotations

import bisect
import json
import os
from pathlib import Path

# First match wins: a kernel's name, lower-cased, containing one of these words.
GROUPS = (
    ("communication", ("nccl",)),
    ("attention", ("flash", "fmha", "attention", "cudnn", "sdpa")),
    ("optimizer", ("adam", "multi_tensor", "l2norm")),
    ("matmul", ("gemm", "cutlass", "nvjet", "xmma", "wgmma", "grouped_mm", "cublas", "gmm")),
    ("copy", ("memcpy", "memset", "copy", "cat", "index", "scatter", "gather", "sort")),
    ("elementwise", ("triton", "elementwise", "reduce", "norm", "softmax", "fill", "kernel")),
)


HOST_WAITS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "cudaStreamSynchronize",
              "aten::_to_copy", "cudaMemcpyAsync")


def is_annotation(name: str) -> bool:
    """A range that a `record_function` or torch.distributed (`nccl:all_gather`...) marks on the
    GPU's timeline around kernels, not a kernel: counting it would count its kernels twice."""
    return "#" in name or name.startswith(("ProfilerStep", "nccl:"))


def group_of(kernel: str) -> str:
    name = kernel.lower()
    return next((group for group, words in GROUPS if any(w in name for w in words)), "other")


class StepProfile:
    """Profiles steps [first, first + count) when MOE_TORCH_PROFILE names a file."""

    def __init__(self, rank0: bool, first: int, count: int = 2):
        self.path = os.environ.get("MOE_TORCH_PROFILE")
        self.first, self.count = first, count
        self.profiler = self.syncs = None
        self.rank0 = rank0

    def before_step(self, step: int) -> None:
        import torch

        if self.path and step == self.first and torch.cuda.is_available():
            from torch.profiler import ProfilerActivity, profile

            stacks = bool(os.environ.get("MOE_TORCH_PROFILE_STACKS"))
            self.profiler = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=stacks,
                                    experimental_config=torch._C._profiler._ExperimentalConfig(verbose=stacks))
            self.profiler.__enter__()
            if stacks:
                self.syncs = SyncLog()

    def after_step(self, step: int) -> None:
        if self.profiler is None or step != self.first + self.count:
            return
        import torch

        torch.cuda.synchronize()
        self.profiler.__exit__(None, None, None)
        sync_warnings = self.syncs.close(self.count) if self.syncs is not None else None
        if self.rank0:
            summary = summarise(self.profiler, self.count)
            if sync_warnings is not None:
                summary["sync_warnings"] = sync_warnings
            Path(self.path).write_text(json.dumps(summary, indent=1))
        self.profiler = self.syncs = None


class SyncLog:
    """Where the host waited on the GPU, by Python stack: torch's sync debug mode warns at every
    operation that synchronises (a device value read on the host, a copy from pageable memory),
    and each warning's stack is counted here, torch's own frames included."""

    def __init__(self):
        import warnings

        import torch

        self.counts: dict[str, int] = {}
        self.shown, self.filters = warnings.showwarning, warnings.filters[:]
        warnings.showwarning = self.record
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")

    def record(self, message, category, filename, lineno, file=None, line=None):
        import traceback

        if "synchroniz" not in str(message).lower():
            return self.shown(message, category, filename, lineno, file, line)
        frames = [f"{Path(f.filename).name}({f.lineno}): {f.name}" for f in traceback.extract_stack()[:-1]
                  if "warnings.py" not in f.filename and "profile.py" not in f.filename][-7:]
        where = " <- ".join(reversed(frames))
        self.counts[where] = self.counts.get(where, 0) + 1

    def close(self, steps: int) -> list[dict]:
        import warnings

        import torch

        torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning, warnings.filters[:] = self.shown, self.filters
        return [{"at": where, "per_step": count / steps}
                for where, count in sorted(self.counts.items(), key=lambda kv: -kv[1])[:30]]


def summarise(profiler, steps: int) -> dict:
    from torch.autograd import DeviceType

    kernels, host = {}, {}
    for event in profiler.key_averages():
        if getattr(event, "device_type", None) == DeviceType.CPU:
            # the host side: operators' own time, where a launch-bound step spends it
            host[event.key] = (event.self_cpu_time_total / 1e3 / steps, event.count // steps)
            continue
        if getattr(event, "device_type", None) != DeviceType.CUDA or is_annotation(event.key):
            continue  # user annotations span kernels that are counted themselves
        time = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
        entry = kernels.setdefault(event.key, [0.0, 0])
        entry[0] += time / 1e3 / steps  # ms per step
        entry[1] += event.count // steps
    total = sum(t for t, _ in kernels.values()) or 1.0
    groups: dict[str, float] = {}
    for name, (ms, _) in kernels.items():
        groups[group_of(name)] = groups.get(group_of(name), 0.0) + ms
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:25]
    # what makes the host wait: operators that read a device value (with Python stacks when recorded)
    waits: dict[str, int] = {}
    for event in profiler.events():
        if event.name in HOST_WAITS:
            frames = [f for f in (event.stack or []) if "torch/" not in f and "<built-in" not in f][:4]
            where = f"{event.name} <- {' <- '.join(frames)}"
            waits[where] = waits.get(where, 0) + 1
    return {
        **gpu_idle(profiler, steps),
        "host_waits": [{"where": where[:400], "calls_per_step": count / steps}
                       for where, count in sorted(waits.items(), key=lambda kv: -kv[1])[:30]],
        "gpu_ms_per_step": round(total, 2),
        "groups": {g: {"ms_per_step": round(ms, 2), "share": round(ms / total, 4)}
                   for g, ms in sorted(groups.items(), key=lambda kv: -kv[1])},
        "host_ms_per_step": round(sum(ms for ms, _ in host.values()), 2),
        "host_syncs_per_step": sum(calls for name, (_, calls) in host.items()
                                   if "Synchronize" in name or name == "aten::_local_scalar_dense"),
        "top_host_ops": [{"name": name[:120], "self_ms_per_step": round(ms, 3), "calls_per_step": calls}
                         for name, (ms, calls) in sorted(host.items(), key=lambda kv: -kv[1][0])[:25]],
        "top_kernels": [{"name": name[:160], "group": group_of(name), "ms_per_step": round(ms, 3),
                         "calls_per_step": calls, "share": round(ms / total, 4)} for name, (ms, calls) in top],
    }


def gpu_idle(profiler, steps: int, shortest_ms: float = 0.1) -> dict:
    """Time the GPU ran no kernel between the profile's first and last, per step, and the gaps of
    at least `shortest_ms` grouped by the Python frames of the operator that launched the kernel
    ending each gap: a gap is the host catching up (after a synchronisation, or Python work
    that launches nothing), and that operator says how far into the step it was."""
    from torch.autograd import DeviceType

    events = profiler.events()
    # (annotations that span kernels, as in summarise, are not kernels)
    kernels = sorted((e for e in events if getattr(e, "device_type", None) == DeviceType.CUDA
                      and not is_annotation(e.name)),
                     key=lambda e: e.time_range.start)
    if not kernels:
        return {}
    # a kernel that ends a gap started as soon as it was launched: the last launch call before it
    launches = sorted((e for e in events if getattr(e, "device_type", None) == DeviceType.CPU
                       and e.name.startswith(("cudaLaunch", "cuLaunch", "cudaMemcpy", "cudaMemset"))),
                      key=lambda e: e.time_range.start)
    starts = [e.time_range.start for e in launches]
    idle, busy_until, gaps = 0.0, kernels[0].time_range.end, {}
    for kernel in kernels[1:]:
        gap = (kernel.time_range.start - busy_until) / 1e3  # ms
        if gap > 0:
            idle += gap
        if gap >= shortest_ms:
            at = bisect.bisect_right(starts, kernel.time_range.start) - 1
            entry = gaps.setdefault(_called_from(launches[at] if at >= 0 else None), [0.0, 0])
            entry[0] += gap
            entry[1] += 1
        busy_until = max(busy_until, kernel.time_range.end)
    span = (busy_until - kernels[0].time_range.start) / 1e3
    syncs: dict[str, list] = {}  # the host waiting for the GPU: after each, its queue starts empty
    for event in events:
        if getattr(event, "device_type", None) == DeviceType.CPU and "Synchronize" in event.name:
            entry = syncs.setdefault(_called_from(event, torch_frames=True), [0.0, 0])
            entry[0] += (event.time_range.end - event.time_range.start) / 1e3
            entry[1] += 1
    listed = lambda found, key: [{key: where[:400], "ms_per_step": round(ms / steps, 3), "per_step": count / steps}  # noqa: E731
                                 for where, (ms, count) in sorted(found.items(), key=lambda kv: -kv[1][0])[:20]]
    return {
        "wall_ms_per_step": round(span / steps, 2),
        "gpu_idle_ms_per_step": round(idle / steps, 2),
        "idle_gaps": listed(gaps, "before"),
        "syncs": listed(syncs, "at"),
    }


def _called_from(event, torch_frames: bool = False) -> str:
    """A runtime call's enclosing operators up to the first with a Python stack, and that stack
    (without torch's own frames unless `torch_frames`)."""
    op, names = event, []
    while op is not None and not op.stack and len(names) < 4:
        op, names = op.cpu_parent, names + [op.name]
    frames = [f for f in (op.stack if op is not None else [])
              if (torch_frames or "torch/" not in f) and "<built-in" not in f]
    return " <- ".join(names + ([op.name] if op is not None else []) + frames[:5 if torch_frames else 3]) or "?"
