"""A LoRA run's adapters as a PEFT adapter folder (`launcher convert mcore-to-hf --lora-adapter`).

PEFT keeps one A/B pair per Hugging Face linear module. Each adapter of the run maps through
the family's conversion rule of the weight it adapts: A is the same for every Hugging Face module
that rule makes of the weight (megatron-core's fused QKV projection is q, k and v; a SwiGLU fc1
is gate and up), B is split as the rule splits the weight's rows. Routed experts, which
transformers fuses into 3-D tensors (`experts.gate_up_proj`, `experts.down_proj`), go out as
PEFT's `target_parameters`: one pair per expert stacked along the rank (A's rows expert by
expert, B's columns rank-major), with dropout 0, which PEFT requires there; where those
adapters sit in the model (PEFT nests the wrappers of two parameters of one module) is read
off PEFT itself, on a model built on the meta device. The router (not a linear module in every
family) is refused with a pointer to --lora-merge; so are DeepSeek-V3's MLP adapters, which PEFT
loads without applying them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from trainer.convert import hf_files
from trainer.convert.families import rules_for


def lora_adapter(src: Path, original: Path, out: Path) -> dict:
    import torch
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
    refused = [p.removesuffix(".lora") for p in prefixes if p.endswith(".router.lora")]
    if refused:
        raise ValueError(f"{src}: PEFT cannot hold the adapters of {refused[0]}"
                         f"{f' and {len(refused) - 1} more' if len(refused) > 1 else ''} (routers); write full "
                         "weights with --lora-merge instead, or train without them (model.lora.target_modules "
                         "without router)")
    if config.get("model_type") == "deepseek_v3" and any(".mlp." in p for p in prefixes):
        # measured with peft 0.21 and transformers 5: the adapters load, and the model's logits
        # stay the base model's (PEFT maps this family's MLP modules to fused ones)
        raise ValueError(f"{src}: PEFT does not apply adapters on DeepSeek-V3's MLPs (dense and shared experts); "
                         "write full weights with --lora-merge instead")
    tensors, modules = {}, []
    experts = [p for p in prefixes if ".mlp.experts." in p]
    parameters = _expert_parameters(experts, original, lora) if experts else {}
    for prefix in experts:
        a = adapters[f"{prefix}.A"]  # [experts, r, in]
        b = (torch.cat([adapters[f"{prefix}.B_w"], adapters[f"{prefix}.B_v"]], dim=1)  # [experts, out, r]
             if f"{prefix}.B_w" in adapters else adapters[f"{prefix}.B"])
        count, name = parameters[prefix]
        if a.shape[0] == 1:  # expert_adapters: shared, the same pair for every expert
            a, b = a.expand(count, -1, -1), b.expand(count, -1, -1)
        tensors[f"{name}.lora_A.weight"] = a.reshape(-1, a.shape[-1]).contiguous()
        tensors[f"{name}.lora_B.weight"] = b.permute(1, 2, 0).reshape(b.shape[1], -1).contiguous()
    for prefix in (p for p in prefixes if p not in experts):
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
                "lora_dropout": 0.0 if experts else lora["dropout"], "bias": "none", "fan_in_fan_out": False,
                "inference_mode": True, "base_model_name_or_path": str(original),
                # exactly these modules (a layer left out by exclude_modules stays unadapted)
                "target_modules": "^(" + "|".join(re.escape(m) for m in modules) + ")$" if modules else [],
                "target_parameters": _expert_targets(experts) or None}
    tmp = _start_output(out)
    save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    (tmp / "adapter_config.json").write_text(json.dumps(settings, indent=2) + "\n")
    for name in hf_files.SIDE_FILES:
        if name != "config.json" and (original / name).exists():
            (tmp / name).write_bytes((original / name).read_bytes())
    _finish_output(tmp, out)
    if experts and lora["dropout"]:
        print(f"mcore-to-hf: lora_dropout {lora['dropout']} written as 0 (PEFT's expert parameters take none)",
              flush=True)
    print(f"mcore-to-hf: PEFT adapter for {len(modules)} modules and {len(experts)} expert parameters -> {out}",
          flush=True)
    return {"direction": "mcore-to-hf", "adapter_modules": len(modules), "adapter_parameters": len(experts),
            "output": str(out)}


EXPERT_PARAMETER = {"linear_fc1": "gate_up_proj", "linear_fc2": "down_proj"}  # transformers' fused experts


def _expert_targets(experts: list[str]) -> list[str]:
    """PEFT target_parameters: each adapted experts' tensor, by its full name (a layer left out
    by exclude_modules stays unadapted)."""
    targets = []
    for prefix in experts:
        layer = int(prefix.split(".")[2])  # decoder.layers.<i>.mlp.experts.linear_fc<n>.lora
        targets.append(f"model.layers.{layer}.mlp.experts.{EXPERT_PARAMETER[prefix.split('.')[-2]]}")
    return targets


def _expert_parameters(experts: list[str], original: Path, lora: dict) -> dict[str, tuple[int, str]]:
    """For each experts' adapter: (experts in the tensor, the key prefix PEFT gives its pair)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    targets = _expert_targets(experts)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(original, local_files_only=True))
        peft_model = get_peft_model(model, LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"], target_modules=[],
                                                      target_parameters=targets))
    placed = {}
    for path, module in peft_model.named_modules():
        name = getattr(module, "parameter_name", None)
        if name is not None and hasattr(module, "num_experts"):
            layer = int(path.split(".layers.")[1].split(".")[0])
            placed[f"model.layers.{layer}.mlp.experts.{name}"] = (module.num_experts, path)
    found = {}
    for prefix, target in zip(experts, targets):
        if target not in placed:
            raise ValueError(f"{original}: PEFT finds no tensor {target} for the adapters of "
                             f"{prefix.removesuffix('.lora')}; write full weights with --lora-merge instead")
        found[prefix] = placed[target]
    return found
