"""moe-launcher: plan, render, submit and follow megatron-core MoE fine-tuning jobs.

This package is the control plane. It never imports torch or megatron: `launcher render`
must start in well under a second on a laptop with neither installed.
"""

__version__ = "0.1.0"
