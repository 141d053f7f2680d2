"""Run under torchrun: this rank's checkpoint tensor keys for the tiny model with SequentialMLP
and with GroupedMLP experts (what the GPU runs), written as JSON to argv[2]."""

import json
import sys

import torch
import torch.distributed as dist


def keys(model, prefix: str = "") -> list[str]:
    """Tensor keys of the model's checkpoint, or of an optimizer state (megatron-core's
    optimizers put their prefix in front of each model key, factories included)."""
    from dataclasses import replace

    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory, apply_factories

    from trainer.checkpoint import MODEL_FORMAT

    state = model.sharded_state_dict(metadata=MODEL_FORMAT)
    state = {k: replace(v, key=prefix + v.key) if isinstance(v, (ShardedTensor, ShardedTensorFactory)) else v
             for k, v in state.items()}
    apply_factories(state)
    return sorted(v.key for v in nested_values(state) if isinstance(v, ShardedTensor))


def main():
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    from launcher.recipe import load_recipe
    from trainer.loop import setup
    from trainer.model.build import layer_spec, read_model_args, transformer_config

    recipe = load_recipe(sys.argv[1])
    setup(recipe)
    args = read_model_args(recipe.model.path)
    found = {}
    for grouped in (False, True):
        config = transformer_config(args, recipe, torch.bfloat16)
        config.moe_grouped_gemm = grouped
        model = GPTModel(config=config, transformer_layer_spec=layer_spec(config), vocab_size=args.vocab_size,
                         max_sequence_length=recipe.data.max_length, pre_process=ps.is_pipeline_first_stage(),
                         post_process=ps.is_pipeline_last_stage(), position_embedding_type="rope")
        name = "grouped" if grouped else "sequential"
        found[name] = keys(model)
        found[f"{name} optimizer"] = keys(model, "optimizer.state.exp_avg.")
    with open(f"{sys.argv[2]}.{dist.get_rank()}", "w") as f:
        json.dump(found, f)


if __name__ == "__main__":
    main()
