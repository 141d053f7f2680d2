"""Checkpoint conversion between Hugging Face safetensors and the trainer's megatron-core
checkpoints, streaming tensor by tensor (see convert.py)."""
