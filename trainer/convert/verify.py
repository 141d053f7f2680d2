"""Check a conversion by logits: the trainer's megatron-core model, loaded from the converted
checkpoint, against the transformers model loaded from the Hugging Face directory, on the
same tokens, in float32. Run alone or under torchrun with a layout (--tp, --ep); meant for
small or shrunken models, since both models are built in full precision.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist


def megatron_logits(hf_path: Path, mcore_path: Path, tokens: torch.Tensor, tp: int, ep: int) -> torch.Tensor | None:
    """Full-vocabulary logits [batch, seq, vocab] on rank 0 (None elsewhere)."""
    from launcher.recipe import load_recipe
    from launcher.resources import resource_dir
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from trainer import checkpoint, devices
    from trainer.loop import setup
    from trainer.model.build import build_model

    if "RANK" not in os.environ:  # run alone, not under torchrun: a group of one
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    world = int(os.environ["WORLD_SIZE"])
    recipe = load_recipe(resource_dir("recipes") / "tiny_moe.yaml", [
        f"model.path={hf_path}", f"trainer.n_gpus_per_node={world}", f"data.max_length={tokens.shape[1]}",
        f"megatron.tensor_model_parallel_size={tp}", f"megatron.expert_model_parallel_size={ep}",
        f"megatron.sequence_parallel={'true' if tp > 1 else 'false'}"])
    from trainer.convert.convert import lora_checkpoint

    lora = lora_checkpoint(mcore_path)  # a LoRA run's checkpoint: its base, with its adapters
    setup(recipe)
    model = build_model(recipe, torch.float32, pre_process=True, post_process=True)
    if lora:
        from launcher.recipe import LoraSection
        from trainer.model import lora as adapters

        adapters.attach(model, LoraSection(**lora[1]), seed=0)
    model.to(devices.device())
    checkpoint.load_weights(lora[0] if lora else mcore_path, [model])
    if lora:
        checkpoint.load_adapters(mcore_path, [model])
    model.eval()
    position_ids = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        logits = model(tokens.to(devices.device()), position_ids.to(devices.device()), None)
        logits = gather_from_tensor_model_parallel_region(logits)
    return logits.float().cpu() if dist.get_rank() == 0 else None


def transformers_logits(hf_path: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_path), dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(tokens).logits.float()


def verify(hf_path: Path, mcore_path: Path, tp: int = 1, ep: int = 1, length: int = 32, seed: int = 0,
           atol: float = 1e-4, save_to: Path | None = None) -> float | None:
    """Largest absolute logit difference (on rank 0); raises when it is above atol."""
    import json

    vocab = json.loads((hf_path / "config.json").read_text())["vocab_size"]
    tokens = torch.randint(vocab, (2, length), generator=torch.Generator().manual_seed(seed))
    ours = megatron_logits(hf_path, mcore_path, tokens, tp, ep)
    diff = None
    if ours is not None:
        theirs = transformers_logits(hf_path, tokens)
        diff = float((ours - theirs).abs().max())
        if save_to is not None:
            torch.save({"megatron": ours, "transformers": theirs}, save_to)
        print(f"verify: max |logit difference| {diff:.3g} over {tokens.numel()} tokens (TP={tp}, EP={ep}); "
              f"logits range {float(theirs.abs().max()):.3g}", flush=True)
    # The other ranks wait for rank 0 here: a rank that leaves while the group is alive aborts.
    dist.barrier()
    dist.destroy_process_group()
    if diff is not None and diff > atol:
        raise ValueError(f"logits differ by {diff:.3g} > {atol:g}: the conversion or the model mapping is wrong")
    return diff
