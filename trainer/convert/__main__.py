"""python -m trainer.convert {hf-to-mcore,mcore-to-hf,verify} ... (what `launcher convert` runs).

Under torchrun the conversions split their work over the ranks (each rank converts its share
and writes its own files). Bad input ends with one line naming what is wrong and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

# megatron-core without transformer-engine or apex, and DCP in a single process, both say so
# on every run; neither matters for a conversion.
warnings.filterwarnings("ignore", message=".*(Transformer Engine and Apex|torch.distributed is disabled).*")


def parse(argv):
    parser = argparse.ArgumentParser(prog="launcher convert", description="Hugging Face <-> megatron-core checkpoints")
    sub = parser.add_subparsers(dest="direction", required=True)
    to_mcore = sub.add_parser("hf-to-mcore", help="Hugging Face safetensors -> megatron-core torch_dist")
    to_mcore.add_argument("--hf-model-path", type=Path, required=True)
    to_mcore.add_argument("--output-path", type=Path, required=True)
    to_mcore.add_argument("--mtp", action="store_true",
                          help="also convert DeepSeek-V3's multi-token-prediction layer (for model.enable_mtp)")
    to_hf = sub.add_parser("mcore-to-hf", help="a trainer checkpoint -> Hugging Face safetensors")
    to_hf.add_argument("--mcore-path", type=Path, required=True,
                       help="a step_N checkpoint, or the checkpoint folder (its `latest` is used)")
    to_hf.add_argument("--hf-model-path", type=Path, required=True, help="the original model directory")
    to_hf.add_argument("--output-path", type=Path, required=True)
    to_hf.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                       help="weights' dtype (default: the original config's)")
    to_hf.add_argument("--shard-size-gib", type=float, default=4.0)
    lora_out = to_hf.add_mutually_exclusive_group()
    lora_out.add_argument("--lora-merge", action="store_true",
                          help="a LoRA run's checkpoint: write its base with the adapters merged in")
    lora_out.add_argument("--lora-adapter", action="store_true",
                          help="a LoRA run's checkpoint: write its adapters as a PEFT adapter folder")
    check = sub.add_parser("verify", help="compare the megatron-core model's logits with transformers'")
    check.add_argument("--hf-model-path", type=Path, required=True)
    check.add_argument("--mcore-path", type=Path, required=True)
    check.add_argument("--tp", type=int, default=1)
    check.add_argument("--ep", type=int, default=1)
    check.add_argument("--tokens", type=int, default=32)
    check.add_argument("--atol", type=float, default=1e-4)
    check.add_argument("--save-logits", type=Path)
    for p in (to_mcore, to_hf):
        p.add_argument("--json", action="store_true", help="print the summary as JSON")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    try:
        if args.direction == "verify":
            from trainer.convert.verify import verify

            verify(args.hf_model_path, _checkpoint(args.mcore_path), args.tp, args.ep, args.tokens,
                   atol=args.atol, save_to=args.save_logits)
            return 0
        import torch.distributed as dist

        from trainer.convert.convert import hf_to_mcore, mcore_to_hf

        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
            dist.init_process_group("gloo")
        if args.direction == "hf-to-mcore":
            summary = hf_to_mcore(args.hf_model_path, args.output_path, mtp=args.mtp)
        elif args.lora_adapter:
            from trainer.convert.peft_export import lora_adapter

            summary = lora_adapter(_checkpoint(args.mcore_path), args.hf_model_path, args.output_path)
        else:
            summary = mcore_to_hf(_checkpoint(args.mcore_path), args.hf_model_path, args.output_path,
                                  dtype=args.dtype, shard_gib=args.shard_size_gib, lora_merge=args.lora_merge)
        if args.json and int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(summary))
        return 0
    except (ValueError, FileNotFoundError) as error:
        if int(os.environ.get("RANK", "0")) == 0:  # every rank finds the same problem; say it once
            print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _checkpoint(path: Path) -> Path:
    """A trainer checkpoint folder means its newest complete checkpoint."""
    pointer = path / "latest"
    if pointer.exists():
        return path / pointer.read_text().strip()
    return path


if __name__ == "__main__":
    sys.exit(main())
