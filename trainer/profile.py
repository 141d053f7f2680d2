"""Where a step's time goes: a torch profile of the last two training steps, summarised by
kernel group (matmul, attention, elementwise, communication, optimizer, copy), with the host's
busiest operators and what made it wait on the GPU. Turned on with MOE_TORCH_PROFILE=FILE.json
(the benchmark does; MOE_TORCH_PROFILE_STACKS=1 adds the Python stack of each wait); rank 0
writes the summary."""

from __future__ import annotations

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


def group_of(kernel: str) -> str:
    name = kernel.lower()
    return next((group for group, words in GROUPS if any(w in name for w in words)), "other")


class StepProfile:
    """Profiles steps [first, first + count) when MOE_TORCH_PROFILE names a file."""

    def __init__(self, rank0: bool, first: int, count: int = 2):
        self.path = os.environ.get("MOE_TORCH_PROFILE")
        self.first, self.count = first, count
        self.profiler = None
        self.rank0 = rank0

    def before_step(self, step: int) -> None:
        import torch

        if self.path and step == self.first and torch.cuda.is_available():
            from torch.profiler import ProfilerActivity, profile

            stacks = bool(os.environ.get("MOE_TORCH_PROFILE_STACKS"))
            self.profiler = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=stacks,
                                    experimental_config=torch._C._profiler._ExperimentalConfig(verbose=stacks))
            self.profiler.__enter__()

    def after_step(self, step: int) -> None:
        if self.profiler is None or step != self.first + self.count:
            return
        import torch

        torch.cuda.synchronize()
        self.profiler.__exit__(None, None, None)
        if self.rank0:
            Path(self.path).write_text(json.dumps(summarise(self.profiler, self.count), indent=1))
        self.profiler = None


def summarise(profiler, steps: int) -> dict:
    from torch.autograd import DeviceType

    kernels, host = {}, {}
    for event in profiler.key_averages():
        if getattr(event, "device_type", None) == DeviceType.CPU:
            # the host side: operators' own time, where a launch-bound step spends it
            host[event.key] = (event.self_cpu_time_total / 1e3 / steps, event.count // steps)
            continue
        if getattr(event, "device_type", None) != DeviceType.CUDA or "#" in event.key \
                or event.key.startswith("ProfilerStep"):
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
