"""python -m trainer --config RUN_DIR/recipe.yaml [--run-dir DIR], under torchrun."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="trainer", description="megatron-core MoE SFT")
    parser.add_argument("--config", required=True, type=Path, help="the resolved recipe")
    parser.add_argument("--run-dir", type=Path, help="metrics and logs go here (default: the config's folder)")
    args = parser.parse_args(argv)
    from trainer.lifetime import end_with_parent, forks_end_with_this_process

    if "TORCHELASTIC_RUN_ID" in os.environ:  # a rank ends with torchrun (trainer.lifetime says why)
        end_with_parent()
    forks_end_with_this_process()
    run_dir = args.run_dir or args.config.resolve().parent
    run_dir.mkdir(parents=True, exist_ok=True)

    from launcher.errors import UserError
    from launcher.plan.models import read_model
    from launcher.recipe import load_recipe
    from trainer.data.parquet import BadRow, DataError
    from trainer.loop import CollectiveTimeout
    from trainer.model.hf_config import UnsupportedConfig

    try:
        recipe = load_recipe(args.config)
        from trainer import loop
        from trainer.data.batches import SFTData
        from trainer.data.chat import load_tokenizer
        from trainer.model.build import read_model_args

        read_model_args(recipe.model.path)  # refuse config.json fields the trainer would ignore
        model_dims = read_model(recipe.model.path)
        tokenizer = load_tokenizer(recipe.model.tokenizer_path)
        align = loop.packing_align(recipe)
        train_data = SFTData(recipe.data.train_files, recipe.data, tokenizer, recipe.trainer.seed, align)
        val_rows = []
        if recipe.data.val_files:
            val_config = dataclasses.replace(recipe.data, shuffle=False)  # the same rows every pass
            val_rows = list(SFTData(recipe.data.val_files, val_config, tokenizer, recipe.trainer.seed, align).rows(0))
        if recipe.trainer.total_training_steps is None:
            rows = train_data.count_rows(recipe.data.global_batch_size)
            recipe.trainer.total_training_steps = max(
                1, math.ceil(rows * recipe.trainer.total_epochs / recipe.data.global_batch_size))
        loop.setup(recipe)
        return loop.train(recipe, run_dir, model_dims, tokenizer, train_data, val_rows)
    except (UserError, DataError, BadRow, UnsupportedConfig) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        (run_dir / "BAD_INPUT").write_text(f"{err}\n")  # the job script does not retry bad input
        return 2
    except CollectiveTimeout as err:  # a hung or dead rank: one line, the job fails
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
