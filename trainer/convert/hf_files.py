"""Hugging Face checkpoints: safetensors shards read one tensor at a time, and written one
shard at a time, with the index that transformers reads.

DeepSeek-V3's released weights are FP8 (e4m3) with one float32 scale per 128x128 block, stored
beside each weight as `<name>_scale_inv`; reading such a weight returns it dequantised to bf16.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEX = "model.safetensors.index.json"
SCALE_SUFFIX = "_scale_inv"
# Files a model directory carries beside its weights, copied to a converted model.
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja")


class HFCheckpoint:
    def __init__(self, path: Path):
        self.path = path
        config_file = path / "config.json"
        if not config_file.exists():
            raise ValueError(f"{config_file}: not found; --hf-model-path must be a Hugging Face model directory")
        self.config = json.loads(config_file.read_text())
        if (path / INDEX).exists():
            self.file_of = json.loads((path / INDEX).read_text())["weight_map"]
        elif (path / "model.safetensors").exists():
            with safe_open(path / "model.safetensors", "pt") as f:
                self.file_of = {name: "model.safetensors" for name in f.keys()}
        else:
            raise ValueError(f"{path}: no model.safetensors or {INDEX} (only safetensors checkpoints are read)")
        quant = self.config.get("quantization_config") or {}
        self.fp8_block = quant.get("weight_block_size") if quant.get("quant_method") == "fp8" else None
        self._open_name, self._open = None, None

    def names(self) -> list[str]:
        """Tensor names in file order (FP8 scales are read with their weights)."""
        names = [n for n in self.file_of if not (self.fp8_block and n.endswith(SCALE_SUFFIX))]
        return sorted(names, key=lambda n: (self.file_of[n], n))

    def _file(self, name: str):
        file = self.file_of[name]
        if file != self._open_name:  # one shard open at a time: its pages are the memory we touch
            self._open = None
            self._open = safe_open(self.path / file, "pt")
            self._open_name = file
        return self._open

    def get(self, name: str) -> torch.Tensor:
        tensor = self._file(name).get_tensor(name)
        scale_name = name + SCALE_SUFFIX
        if self.fp8_block and tensor.dtype == torch.float8_e4m3fn and scale_name in self.file_of:
            tensor = dequantise(tensor, self._file(scale_name).get_tensor(scale_name), self.fp8_block)
        return tensor

    def meta(self, name: str) -> torch.Tensor:
        """A shape-and-dtype stand-in for what get() returns, without reading the data."""
        piece = self._file(name).get_slice(name)
        dtype = _DTYPES[piece.get_dtype()]
        if self.fp8_block and dtype == torch.float8_e4m3fn and name + SCALE_SUFFIX in self.file_of:
            dtype = torch.bfloat16  # dequantised on the way in
        return torch.empty(piece.get_shape(), dtype=dtype, device="meta")

    def nbytes(self, name: str) -> int:
        """Bytes stored in the file (what reading costs)."""
        piece = self._file(name).get_slice(name)
        return torch.Size(piece.get_shape()).numel() * _DTYPES[piece.get_dtype()].itemsize

    def close(self) -> None:
        self._open, self._open_name = None, None


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
           "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def dequantise(weight: torch.Tensor, scale_inv: torch.Tensor, block: list[int]) -> torch.Tensor:
    """FP8 weight times its per-block scale (blocks at the edges may be partial), in bf16."""
    rows, cols = weight.shape
    scale = scale_inv.float().repeat_interleave(block[0], dim=0)[:rows].repeat_interleave(block[1], dim=1)[:, :cols]
    return (weight.float() * scale).to(torch.bfloat16)


def write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


def write_index(path: Path, file_of: dict[str, str], total_bytes: int) -> None:
    index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(file_of.items()))}
    (path / INDEX).write_text(json.dumps(index, indent=2) + "\n")
