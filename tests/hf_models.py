"""Tiny random Hugging Face models of the four families, built with transformers from shrunken
copies of the shipped config.json files (no hub), saved as multi-shard safetensors."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import RECIPES
from tests.test_families import SHRINK

FAMILIES = sorted(SHRINK)


def tiny_config(family: str, **changes) -> dict:
    config = json.loads((RECIPES / "models" / family / "config.json").read_text())
    config.update(SHRINK[family])
    config.update(changes)
    config["torch_dtype"] = "float32"
    return {k: v for k, v in config.items() if v is not None}


def save_tiny_model(family: str, out: Path, seed: int = 0, **changes) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(**tiny_config(family, **changes))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # norms and the expert bias start at 1 and 0: make them tell layers apart
        for name, param in model.named_parameters():
            if "norm" in name or "e_score_correction_bias" in name:
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(out, max_shard_size="200KB")
    return out


def read_all(path: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors
