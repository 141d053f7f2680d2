"""The compute device: CUDA when there is one, otherwise the CPU behind a small shim.

megatron-core is written for CUDA: it allocates with device="cuda" or
torch.cuda.current_device(), calls .cuda(), records streams and events, and keeps a
"CUDA" random state that it forks for tensor- and expert-parallel initialisation. On a
machine without a GPU, `install_cpu_shim` lets that same code run on the CPU over gloo:
- a TorchFunctionMode maps every "cuda" device argument of a torch call to "cpu";
- Tensor.type() names CUDA types (megatron's optimizers check them); Tensor.cuda() returns the tensor; torch.cuda.current_device() is the CPU device;
- streams, events and synchronisation become no-ops;
- all-to-all split sizes, which stay tensors on the CPU, are handed to gloo as lists;
- the "CUDA" random state is a generator of its own, apart from the CPU's, so megatron's
  forks of it never disturb the CPU stream that initialises weights.
Nothing here runs when CUDA is present.
"""

from __future__ import annotations

import contextlib
import sys

import torch
from torch.overrides import TorchFunctionMode

_installed = False


def on_gpu() -> bool:
    return torch.cuda.is_available()


def backend() -> str:
    return "nccl" if on_gpu() else "gloo"


def _to_cpu(value):
    if isinstance(value, torch.device) and value.type == "cuda":
        return torch.device("cpu")
    if isinstance(value, str) and value.startswith("cuda"):
        return "cpu"
    return value


class _CudaToCpu(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs:
            device = kwargs["device"]
            if isinstance(device, int) and not isinstance(device, bool):
                kwargs["device"] = "cpu"  # megatron passes torch.cuda.current_device()
            else:
                kwargs["device"] = _to_cpu(device)
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False  # staging for a host-to-GPU copy; no pinned allocator without CUDA
        if func is torch.Tensor.to and args:
            args = tuple(_to_cpu(a) if i > 0 else a for i, a in enumerate(args))
        result = func(*args, **kwargs)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs and result.startswith("torch."):
            # megatron's optimizers accept parameters by their type name, torch.cuda.FloatTensor
            result = result.replace("torch.", "torch.cuda.", 1)
        return result


class _NoStream:
    """Stands in for torch.cuda.Stream and Event: work on the CPU is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def wait_stream(self, *args):
        pass

    def wait_event(self, *args):
        pass

    def record_event(self, *args):
        return _NoStream()

    def record(self, *args):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def wait(self, *args):
        pass

    def elapsed_time(self, other):
        return 0.0


class _FakeCudaRng:
    """A random state for megatron's CUDA RNG tracker, kept apart from the CPU's."""

    def __init__(self):
        self.generator = torch.Generator()

    def get_rng_state(self, device=None):
        return self.generator.get_state()

    def set_rng_state(self, state, device=None):
        self.generator.set_state(state)

    def manual_seed(self, seed):
        self.generator.manual_seed(int(seed))


def _import_megatron_without_compiling() -> None:
    """megatron-core wraps about 40 fusions in torch.compile as it is imported; the first wrap
    imports dynamo: about 3 s of every CPU process that trains, most of a CPU test's start, for
    fusions the trainer turns off on the CPU. Imported while torch.compile is the identity,
    they stay plain functions (megatron.core.jit keeps the identity for what it wraps later)."""
    if "megatron.core" in sys.modules:
        return
    compile_ = torch.compile
    torch.compile = lambda model=None, **options: model if model is not None else (lambda fn: fn)
    try:
        import megatron.core  # noqa: F401
    finally:
        torch.compile = compile_


def install_cpu_shim() -> None:
    """Let megatron-core's CUDA code paths run on the CPU. Idempotent; never on a GPU machine."""
    global _installed
    if _installed or on_gpu():
        return
    _installed = True
    _import_megatron_without_compiling()
    rng = _FakeCudaRng()
    cuda = torch.cuda
    # A device object rather than 0: allocations in autograd's backward, where the
    # function mode below is not active, then land on the CPU too.
    cuda.current_device = lambda: torch.device("cpu")
    cuda.device_count = lambda: 1
    cuda.set_device = lambda *a, **k: None
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda: None
    cuda.Stream = _NoStream
    cuda.Event = _NoStream
    cuda.current_stream = lambda *a, **k: _NoStream()
    cuda.default_stream = lambda *a, **k: _NoStream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.get_rng_state = rng.get_rng_state
    cuda.set_rng_state = rng.set_rng_state
    cuda.manual_seed = rng.manual_seed
    cuda.manual_seed_all = rng.manual_seed
    cuda.random.get_rng_state = rng.get_rng_state
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0
    torch.Tensor.cuda = lambda self, *a, **k: self
    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._set_cuda_rng_state = lambda state, device=-1, graph_safe=False: rng.set_rng_state(state)
    mcore_random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: rng.get_rng_state()
    # On a GPU, megatron's token dispatcher copies the all-to-all split sizes to host numpy
    # arrays; on the CPU they stay tensors, which gloo's all_to_all_single does not take.
    import torch.distributed as dist

    all_to_all_single = dist.all_to_all_single

    def all_to_all_single_with_lists(output, input, output_split_sizes=None, input_split_sizes=None,
                                     group=None, async_op=False):
        as_list = lambda sizes: sizes.tolist() if hasattr(sizes, "tolist") else sizes  # noqa: E731
        return all_to_all_single(output, input, as_list(output_split_sizes), as_list(input_split_sizes),
                                 group=group, async_op=async_op)

    dist.all_to_all_single = all_to_all_single_with_lists
    _CudaToCpu().__enter__()  # for the life of the process


def patch_megatron() -> None:
    """Two gaps of megatron-core 0.16 without transformer-engine, on the GPU too: moe_utils
    leaves te_general_gemm undefined (0.19 defines it), and multi-latent attention believes
    transformer-engine is there because its megatron wrapper module imports without it."""
    from megatron.core.transformer import multi_latent_attention
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        multi_latent_attention.HAVE_TE = False


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if on_gpu() else torch.device("cpu")
