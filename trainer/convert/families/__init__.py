"""One module per model family: the rules that map a Hugging Face checkpoint's tensors to
the trainer's megatron-core checkpoint keys and back."""

from __future__ import annotations

from importlib import import_module

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3")


def family_module(config: dict, source: str = "config.json"):
    family = config.get("model_type")
    if family not in FAMILIES:
        raise ValueError(f"{source}: model_type '{family}' cannot be converted (supported: {', '.join(FAMILIES)})")
    return import_module(f"trainer.convert.families.{family}")


def rules_for(config: dict, mtp: bool = False, source: str = "config.json"):
    """(rules, dropped prefixes, shared copies) for this config."""
    module = family_module(config, source)
    rules, dropped = module.rules(config, mtp)
    shared = module.shared_copies(config) if mtp and hasattr(module, "shared_copies") else {}
    return rules, dropped, shared
