"""The two conversions, tensor by tensor.

    hf_to_mcore   Hugging Face safetensors -> the trainer's megatron-core checkpoint (torch_dist)
    mcore_to_hf   a trainer checkpoint + the original model directory -> safetensors shards;
                  a LoRA checkpoint (adapters only) is merged into its base: W + alpha/rank B A

Both check that every tensor on one side has its place on the other: a Hugging Face tensor
no rule reads, or a megatron-core tensor no rule fills, is an error naming it. Under torchrun
each rank converts its share (hf_to_mcore: tensors; mcore_to_hf: output shards).
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

from trainer.convert import hf_files, mcore_files
from trainer.convert.families import rules_for
from trainer.convert.progress import Progress

# Buffers some checkpoints carry that the model recomputes.
DERIVED_SUFFIXES = (".rotary_emb.inv_freq",)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _say(text: str) -> None:
    if _rank_world()[0] == 0:
        print(text, flush=True)


def _start_output(out: Path) -> Path:
    """Everything is written into OUT.tmp and renamed at the end: no half-written OUT."""
    if out.exists():
        raise ValueError(f"--output-path {out}: already exists; choose a new directory or remove it")
    tmp = out.with_name(out.name + ".tmp")
    if _rank_world()[0] == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    return tmp


def _finish_output(tmp: Path, out: Path) -> None:
    _barrier()
    if _rank_world()[0] == 0:
        os.replace(tmp, out)
    _barrier()


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def hf_to_mcore(src: Path, out: Path, mtp: bool = False) -> dict:
    start = time.time()
    mcore_files.release_large_frees()
    ckpt = hf_files.HFCheckpoint(src)
    rules, dropped, shared = rules_for(ckpt.config, mtp, str(src / "config.json"))
    present = set(ckpt.names())
    for rule in rules:
        for name in rule.hf:
            if name not in present:
                raise ValueError(f"{src}: tensor {name} (for megatron-core {rule.mcore}) is missing from the checkpoint")
    read = {n for rule in rules for n in rule.hf}
    left_out = sorted(n for n in present if n.startswith(tuple(dropped)))
    unmapped = sorted(n for n in present - read - set(left_out) - set(shared) if not n.endswith(DERIVED_SUFFIXES))
    if unmapped:
        raise ValueError(f"{src}: {len(unmapped)} tensor(s) no rule converts, first {unmapped[0]} "
                         f"(model_type {ckpt.config['model_type']}); the checkpoint does not match its config.json")
    if left_out:
        _say(f"hf-to-mcore: left out {len(left_out)} tensors of the multi-token-prediction layer "
             f"({dropped[0]}*); pass --mtp to convert them for model.enable_mtp")
    for copy_name, original in shared.items():
        if copy_name in present and not torch.equal(ckpt.get(copy_name), ckpt.get(original)):
            raise ValueError(f"{src}: {copy_name} differs from {original}; megatron-core's multi-token "
                             "prediction shares them, so this checkpoint cannot be converted exactly")

    rank, world = _rank_world()
    rules.sort(key=lambda r: (ckpt.file_of[r.hf[0]], r.hf[0]))  # read the shards in order
    mine = rules[rank::world]
    specs = []
    for rule in mine:
        stand_in = rule.to_mcore([ckpt.meta(n) for n in rule.hf])
        specs.append(mcore_files.TensorSpec(rule.mcore, tuple(stand_in.shape), stand_in.dtype))
    by_key = {rule.mcore: rule for rule in mine}
    total = sum(ckpt.nbytes(n) for rule in mine for n in rule.hf)
    everything = sum(ckpt.nbytes(n) for n in read)  # all ranks together, for the summary
    progress = Progress(total, "hf-to-mcore", enabled=rank == 0)

    def produce(key: str) -> torch.Tensor:
        rule = by_key[key]
        tensors = [ckpt.get(n) for n in rule.hf]
        progress.advance(sum(ckpt.nbytes(n) for n in rule.hf))
        return rule.to_mcore(tensors)

    tmp = _start_output(out)
    mcore_files.save(tmp, specs, produce)
    progress.close()
    ckpt.close()
    _finish_output(tmp, out)
    return _summary("hf-to-mcore", len(rules), everything, start, out)


def lora_checkpoint(src: Path) -> tuple[Path, dict] | None:
    """(base checkpoint, the recipe's model.lora) of a LoRA run's checkpoint; None for others."""
    state_file = src / "trainer_state.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    if not state.get("lora_base"):
        return None
    return Path(state["lora_base"]), state["recipe"]["model"]["lora"]


def read_adapters(src: Path) -> dict[str, torch.Tensor]:
    """Every adapter tensor of a LoRA checkpoint, whole (they are small), by key."""
    specs = [spec for key, spec in mcore_files.tensor_specs(src).items() if not key.startswith("optimizer.")]
    return mcore_files.read(src, specs)


EXPERT = re.compile(r"(.*\.mlp\.experts)\.experts\.(\d+)\.(linear_fc[12])")


class Merger:
    """Adds each adapter into the weight it adapts, in megatron-core's layout (before the
    family's rule turns the weight into Hugging Face tensors); every adapter must find its weight.
    A SwiGLU fc1 is stored as its gate (weight_w) and up (weight_v) halves; its adapter's B too
    (B_w, B_v), in a routed experts' stack as well."""

    def __init__(self, src: Path, lora: dict):
        self.adapters = read_adapters(src)
        self.scale = lora["alpha"] / lora["rank"]
        self.unused = {key.rsplit(".", 1)[0] for key in self.adapters}

    def __call__(self, key: str, weight: torch.Tensor) -> torch.Tensor:
        layer, _, suffix = key.rpartition(".")
        if suffix not in ("weight", "weight_w", "weight_v"):
            return weight
        half = suffix.removeprefix("weight").lstrip("_")  # "", "w" or "v"
        expert = EXPERT.fullmatch(layer)
        prefix = f"{expert[1]}.{expert[3]}.lora" if expert else f"{layer}.lora"
        if f"{prefix}.A" not in self.adapters:
            return weight
        a = self.adapters[f"{prefix}.A"].float()
        b = self.adapters[f"{prefix}.B_{half}" if half else f"{prefix}.B"].float()
        if expert:  # a stack, one pair per expert (or one shared by all)
            index = int(expert[2]) if a.shape[0] > 1 else 0
            a, b = a[index], b[index]
        self.unused.discard(prefix)
        return (weight.float() + self.scale * (b @ a)).to(weight.dtype)


def mcore_to_hf(src: Path, original: Path, out: Path, dtype: str | None = None,
                shard_gib: float = 4.0, lora_merge: bool = False) -> dict:
    start = time.time()
    mcore_files.release_large_frees()
    lora = lora_checkpoint(src)
    if lora and not lora_merge:
        raise ValueError(f"{src}: a LoRA checkpoint (adapters on {lora[0]}): pass --lora-merge for full weights "
                         "with the adapters merged, or --lora-adapter for a PEFT adapter folder")
    if lora_merge and not lora:
        raise ValueError(f"--lora-merge: {src} is not a LoRA run's checkpoint (its trainer_state.json names no "
                         "base); convert it without --lora-merge")
    merge = Merger(src, lora[1]) if lora else None
    if lora:
        src = lora[0]  # the weights come from the base, the adapters from the run
    stored = mcore_files.tensor_specs(src)
    config = json.loads((original / "config.json").read_text()) if (original / "config.json").exists() else None
    if config is None:
        raise ValueError(f"{original / 'config.json'}: not found; --hf-model-path is the original model directory")
    mtp = any(k.startswith("mtp.") for k in stored)
    rules, _, shared = rules_for(config, mtp, str(original / "config.json"))
    for rule in rules:
        if rule.mcore not in stored:
            raise ValueError(f"{src}: megatron-core tensor {rule.mcore} is missing; was this checkpoint trained "
                             f"from {original}?")
    model_keys = {k for k in stored if not k.startswith("optimizer.")}
    unmapped = sorted(model_keys - {r.mcore for r in rules})
    if unmapped:
        raise ValueError(f"{src}: {len(unmapped)} megatron-core tensor(s) no rule converts, first {unmapped[0]}")
    name = dtype or config.get("torch_dtype") or config.get("dtype") or "bfloat16"
    if name not in DTYPES:
        raise ValueError(f"--dtype {name}: not supported (choose {', '.join(DTYPES)})")
    target = DTYPES[name]

    # Output shards: rules in order, a shard closed when it passes shard_gib. MTP's embedding
    # and head are written as copies of the model's (megatron-core shares them).
    size = target.itemsize
    shards, outputs, current, current_names, current_bytes = [], [], [], [], 0
    for rule in rules:
        names = []
        for hf_name, t in zip(rule.hf, rule.to_hf(torch.empty(stored[rule.mcore].shape, device="meta"))):
            names += [(n, t.numel()) for n in [hf_name] + [c for c, m in shared.items() if m == hf_name]]
        nbytes = sum(numel for _, numel in names) * size
        if current and current_bytes + nbytes > shard_gib * 2**30:
            shards.append(current)
            outputs.append(current_names)
            current, current_names, current_bytes = [], [], 0
        current.append(rule)
        current_names += names
        current_bytes += nbytes
    shards.append(current)
    outputs.append(current_names)
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]

    rank, world = _rank_world()
    tmp = _start_output(out)
    mine = list(range(rank, len(shards), world))
    total = sum(_stored_bytes(stored[r.mcore]) for i in mine for r in shards[i])
    progress = Progress(total, "mcore-to-hf", enabled=rank == 0)
    for i in mine:
        loaded = mcore_files.read(src, [stored[r.mcore] for r in shards[i]])
        tensors = {}
        for rule in shards[i]:
            weight = loaded.pop(rule.mcore)
            if merge is not None:
                weight = merge(rule.mcore, weight)
            for hf_name, tensor in zip(rule.hf, rule.to_hf(weight)):
                tensors[hf_name] = tensor.to(target)
            progress.advance(_stored_bytes(stored[rule.mcore]))
        for copy_name, main in shared.items():
            if main in tensors:
                tensors[copy_name] = tensors[main].clone()
        hf_files.write_shard(tmp / files[i], tensors)
    progress.close()
    if merge is not None and world == 1 and merge.unused:
        raise ValueError(f"adapters {sorted(merge.unused)[:3]} adapt no weight of {src}; is it the run's base?")
    if rank == 0:
        file_of = {n: files[i] for i, names in enumerate(outputs) for n, _ in names}
        hf_files.write_index(tmp, file_of, sum(numel for names in outputs for _, numel in names) * size)
        _write_side_files(original, tmp, name)
    _finish_output(tmp, out)
    return _summary("mcore-to-hf", len(rules), sum(_stored_bytes(stored[r.mcore]) for r in rules), start, out)


def _stored_bytes(spec: mcore_files.TensorSpec) -> int:
    return torch.Size(spec.shape).numel() * spec.dtype.itemsize


def _write_side_files(original: Path, out: Path, dtype_name: str) -> None:
    for name in hf_files.SIDE_FILES:
        if (original / name).exists() and name != "config.json":
            shutil.copy(original / name, out / name)
    config = json.loads((original / "config.json").read_text())
    if config.pop("quantization_config", None) is not None:
        print(f"mcore-to-hf: weights written in {dtype_name}; quantization_config left out of config.json", flush=True)
    config["torch_dtype"] = dtype_name
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _summary(direction: str, tensors: int, nbytes: int, start: float, out: Path) -> dict:
    seconds = time.time() - start
    summary = {"direction": direction, "tensors": tensors, "bytes_read": nbytes, "seconds": round(seconds, 2),
               "gb_per_s": round(nbytes / 1e9 / max(seconds, 1e-9), 3), "peak_rss_gib": round(peak_rss_gib(), 3),
               "output": str(out)}
    _say(f"{direction}: {tensors} tensors, {nbytes / 1e9:.2f} GB read in {seconds:.1f} s "
         f"({summary['gb_per_s']} GB/s), peak RSS {summary['peak_rss_gib']} GiB (rank 0) -> {out}")
    return summary
