"""The data plane: the megatron-core MoE SFT loop that runs inside each job.

Entry point: `python -m trainer --config RUN_DIR/recipe.yaml` under torchrun.
"""
