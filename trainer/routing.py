"""What the routers did each step: how many tokens chose each expert of each MoE layer, and how
many of those choices a capacity factor dropped (model.override_config.moe_config.capacity_factor).

The routers' own output is the routing map after dropping, and with pad_to_capacity it marks
every expert full (short ones padded with tokens weighted zero), which says nothing about the
load. So the counts come from the map as the router chose it, read inside megatron-core's token
dropping, and the dropped choices are those it left out. Everything stays on the device until
the step is logged (trainer.metrics.InFlight)."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from trainer import devices

_CHOSEN: list = []  # (choices per expert, choices kept) of the router call in progress


class RoutingCounter:
    def __init__(self, model_chunks, num_layers: int, num_experts: int):
        # a column per expert, and a last one for the choices dropped
        self.counts = torch.zeros(num_layers, num_experts + 1, dtype=torch.float64, device=devices.device())
        _watch_token_dropping()
        for chunk in model_chunks:
            for name, module in chunk.named_modules():
                if name.endswith("mlp.router"):
                    module.register_forward_hook(self.hook)

    def hook(self, module, inputs, output):
        chosen = _CHOSEN.pop() if _CHOSEN else None
        if torch._C._current_graph_task_id() != -1:
            return  # the forward run again by activation recompute, inside backward
        row = self.counts[module.layer_number - 1]
        if chosen is None:  # dropless: the router's map is its choice
            row[:-1] += output[1].sum(dim=0).to(row)
            if module.config.moe_expert_capacity_factor is not None:
                row[-1] = float("nan")  # a megatron-core that drops elsewhere: the share is unknown
            return
        per_expert, kept = chosen
        row[:-1] += per_expert.to(row)
        row[-1] += (per_expert.sum() - kept).to(row)

    def take(self) -> torch.Tensor:
        """This step's counts [layers, experts + 1: the dropped choices last], summed over ranks
        (on the device), and a fresh start."""
        dist.all_reduce(self.counts)
        counts = self.counts.clone()
        self.counts.zero_()
        return counts


def per_layer(counts, duplicates: int) -> dict[str, list[int]]:
    """tokens_per_expert as the metrics log it: layers that routed anything, TP duplicates removed."""
    return {f"layer_{i}": [int(round(c / duplicates)) for c in row[:-1]] for i, row in enumerate(counts)
            if sum(row[:-1]) > 0}


def expert_parallel_load(tokens_per_expert: dict[str, list[int]], ep: int) -> float | None:
    """The busiest expert-parallel rank's routed tokens over an even split's, summed over the MoE
    layers, since each layer waits for its busiest rank (EP rank r holds experts r x E/EP onwards,
    in order). 1.0 is even. The benchmark model's untrained router gave 1.36 at EP=2 (median over
    steps; README, "Padding experts to capacity"), forced balancing 1.001. None with one EP rank
    or nothing routed."""
    busiest = mean = 0.0
    for counts in tokens_per_expert.values():
        per_rank = len(counts) // ep
        loads = [sum(counts[r * per_rank:(r + 1) * per_rank]) for r in range(ep)]
        busiest, mean = busiest + max(loads), mean + sum(loads) / ep
    return busiest / mean if ep > 1 and mean else None


def dropped_fraction(counts) -> float | None:
    """The share of routing choices the capacity dropped this step; None when nothing was routed."""
    chosen, dropped = sum(sum(row[:-1]) for row in counts), sum(row[-1] for row in counts)
    return dropped / chosen if chosen and math.isfinite(dropped) else None


def _watch_token_dropping() -> None:
    """Wrap megatron-core's capacity step (once) so that it leaves the router's choice behind."""
    from megatron.core.transformer.moe import router

    original = getattr(router, "apply_router_token_dropping", None)
    if original is None or getattr(original, "watched", False):
        return

    def apply_router_token_dropping(probs, routing_map, *args, **kwargs):
        final_probs, final_map = original(probs, routing_map, *args, **kwargs)
        _CHOSEN[:] = [(routing_map.sum(dim=0), (routing_map & final_map).sum())]
        return final_probs, final_map

    apply_router_token_dropping.watched = True
    router.apply_router_token_dropping = apply_router_token_dropping
