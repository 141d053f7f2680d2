"""A LoRA run's adapters as a PEFT adapter folder (`launcher convert mcore-to-hf --lora-adapter`).

PEFT keeps one A/B pair per Hugging Face linear module. Each adapter of the run maps through
the family's conversion rule of the weight it adapts: A is the same for every Hugging Face module
that rule makes of the weight (megatron-core's fused QKV projection is q, k and v; a SwiGLU fc1
is gate and up), B is split as the rule splits the weight's rows. Routed experts (megatron-core
keeps one pair per expert, transformers fuses experts into 3-D tensors) and the router (not a
linear module in every family) are refused with a pointer to --lora-merge; so are DeepSeek-V3's
MLP adapters, which PEFT loads without applying them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from trainer.convert import hf_files
from trainer.convert.families import rules_for


def lora_adapter(src: Path, original: Path, out: Path) -> dict:
    from safetensors.torch import save_file

    from trainer.convert.convert import _finish_output, _start_output, lora_checkpoint, read_adapters

    found = lora_checkpoint(src)
    if not found:
        raise ValueError(f"--lora-adapter: {src} is not a LoRA run's checkpoint (its trainer_state.json names no "
                         "base); convert it without --lora-adapter")
    _, lora = found
    config = json.loads((original / "config.json").read_text())
    rules = {rule.mcore: rule for rule in rules_for(config, False, str(original / "config.json"))[0]}
    adapters = read_adapters(src)
    prefixes = sorted({key.rsplit(".", 1)[0] for key in adapters})
    refused = [p.removesuffix(".lora") for p in prefixes if ".mlp.experts." in p or p.endswith(".router.lora")]
    if refused:
        raise ValueError(f"{src}: PEFT cannot hold the adapters of {refused[0]}"
                         f"{f' and {len(refused) - 1} more' if len(refused) > 1 else ''} (routed experts and "
                         "routers); write full weights with --lora-merge instead, or train without them "
                         "(model.lora.exclude_modules: ['*.mlp.experts.*'])")
    if config.get("model_type") == "deepseek_v3" and any(".mlp." in p for p in prefixes):
        # measured with peft 0.21 and transformers 5: the adapters load, and the model's logits
        # stay the base model's (PEFT maps this family's MLP modules to fused ones)
        raise ValueError(f"{src}: PEFT does not apply adapters on DeepSeek-V3's MLPs (dense and shared experts); "
                         "write full weights with --lora-merge instead")
    tensors, modules = {}, []
    for prefix in prefixes:
        layer = prefix.removesuffix(".lora")
        a = adapters[f"{prefix}.A"]
        halves = [("weight_w", "B_w"), ("weight_v", "B_v")] if f"{prefix}.B_w" in adapters else [("weight", "B")]
        for weight, part in halves:
            rule = rules.get(f"{layer}.{weight}")
            if rule is None:
                raise ValueError(f"{src}: adapter {prefix} adapts {layer}.{weight}, which {original} has no rule for")
            for hf_name, b in zip(rule.hf, rule.to_hf(adapters[f"{prefix}.{part}"])):
                module = hf_name.removesuffix(".weight")
                tensors[f"base_model.model.{module}.lora_A.weight"] = a.clone().contiguous()
                tensors[f"base_model.model.{module}.lora_B.weight"] = b.clone().contiguous()
                modules.append(module)
    settings = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora["rank"], "lora_alpha": lora["alpha"],
                "lora_dropout": lora["dropout"], "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
                "base_model_name_or_path": str(original),
                # exactly these modules (a layer left out by exclude_modules stays unadapted)
                "target_modules": "^(" + "|".join(re.escape(m) for m in modules) + ")$"}
    tmp = _start_output(out)
    save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    (tmp / "adapter_config.json").write_text(json.dumps(settings, indent=2) + "\n")
    for name in hf_files.SIDE_FILES:
        if name != "config.json" and (original / name).exists():
            (tmp / name).write_bytes((original / name).read_bytes())
    _finish_output(tmp, out)
    print(f"mcore-to-hf: PEFT adapter for {len(modules)} modules -> {out}", flush=True)
    return {"direction": "mcore-to-hf", "adapter_modules": len(modules), "output": str(out)}
