"""Every layout megatron-core accepts for a recipe's model on its GPUs, ranked by estimated speed.

The search varies what decides speed and memory and keeps what decides the training run
(model, sequence length, global batch, GPU count): TP (inside a node), CP, PP with its
uneven first/last stages, VPP, EP, ETP (1 or TP), the micro-batch size, the token dispatcher
(all-to-all or all-gather, which train alike), and the memory options the trainer implements
(bf16 gradient buffers, full recompute, optimizer offload).
Each candidate passes `plan_layout`, the same rules `launcher validate` applies, so every row's
overrides validate; for each layout and micro-batch it keeps the fastest set of memory options
that fits. Pure functions: no I/O, no torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from launcher.cluster import Cluster
from launcher.errors import UserError
from launcher.plan.layout import Layout, divisors, plan_layout
from launcher.plan.memory import Memory, stage_memories
from launcher.plan.models import ModelDims
from launcher.plan.memory import memory_budget
from launcher.plan.speed import Hardware, Speed, estimate_speed, hardware
from launcher.recipe import Recipe

MICRO_BATCHES = (1, 2, 4, 8)
VIRTUAL_STAGES = (1, 2, 4)


@dataclass(frozen=True)
class Candidate:
    overrides: tuple[str, ...]  # key=value strings that `launcher validate` accepts after the recipe
    layout: Layout
    memory: Memory
    speed: Speed
    options: tuple[str, ...]  # the memory options it needs, as recipe keys

    def to_dict(self) -> dict:
        lay = self.layout
        return {"overrides": list(self.overrides), "memory_gib": round(self.memory.total, 2),
                "tokens_per_s_per_gpu": round(self.speed.tokens_per_s_per_gpu, 1),
                "bottleneck": self.speed.bottleneck, "step_s": round(self.speed.step_s, 4),
                "layout": {"tp": lay.tp, "pp": lay.pp, "vpp": lay.vpp, "ep": lay.ep, "etp": lay.etp, "cp": lay.cp,
                           "dp": lay.dp, "edp": lay.edp, "micro_batch_size": self.micro_batch_size,
                           "layers_per_stage": list(lay.stage_layers)},
                "memory_options": list(self.options), "step_parts_s": self.speed.parts}

    @property
    def micro_batch_size(self) -> int:
        return int(next(o for o in self.overrides if o.startswith("data.micro_batch_size=")).split("=")[1])


@dataclass(frozen=True)
class SearchResult:
    candidates: list[Candidate]  # those that fit, fastest first
    valid_layouts: int  # layouts (with micro-batch sizes) megatron-core accepts
    world_size: int
    # Overrides of the valid layouts that fit under no memory option (each at the smallest
    # micro-batch that does not fit; larger ones are not tried)
    too_big: list[tuple[str, ...]]


def search_layouts(recipe: Recipe, cluster: Cluster, model: ModelDims, first_fit: bool = False) -> SearchResult:
    """Rank the layouts for `recipe`'s GPU count; `first_fit` stops at the first one that fits
    with every memory option on (the question "is there any?")."""
    world = recipe.world_size
    gpus_per_node = cluster.gpus_per_node
    node = gpus_per_node or recipe.trainer.n_gpus_per_node  # CPU clusters: processes per node
    seq, gbs = recipe.data.max_length, recipe.data.global_batch_size
    capacity_gib, overhead_gib = memory_budget(recipe, cluster)
    extra = {"overhead_gib": overhead_gib}
    hw = hardware(cluster)
    bf16_only = not recipe.megatron.grad_reduce_in_fp32
    fixed_split = (recipe.megatron.num_layers_in_first_pipeline_stage is not None
                   or recipe.megatron.num_layers_in_last_pipeline_stage is not None)
    may_recompute = not recipe.megatron.overlap_moe_expert_parallel_comm  # (which refuses it: _fastest_fit)
    # both dispatchers train alike, each waiting for the host once a layer or, padded, never
    # (trainer.model.dispatch): each EP layout takes the faster; megatron-core's combined
    # schedule takes the all-to-all only
    base_recipe = _with_dispatcher(recipe, "alltoall") if may_recompute else recipe
    choose = "allgather" if may_recompute else None
    found: list[Candidate] = []
    too_big: list[tuple[str, ...]] = []
    valid = 0
    for tp in [t for t in divisors(min(node, world)) if world % t == 0]:
        for cp in [c for c in divisors(world // tp) if c == 1 or (c & (c - 1) == 0 and seq % (2 * c * tp) == 0)]:
            for pp in [p for p in divisors(world // (tp * cp)) if p <= model.num_layers]:
                dp = world // (tp * cp * pp)
                for vpp in VIRTUAL_STAGES if pp > 1 else (1,):
                    for etp in sorted({1, tp}):
                        for ep in [e for e in divisors(model.num_experts) if world % (etp * e * pp) == 0]:
                            other = choose if ep * etp > 1 else None
                            for mbs in [b for b in MICRO_BATCHES if gbs % (b * dp) == 0]:
                                shape = (tp, cp, pp, vpp, ep, etp, mbs)
                                base = _variant(base_recipe if other else recipe, *shape, (bf16_only, False, False))
                                try:
                                    layout = plan_layout(base, model, gpus_per_node or None)
                                except UserError:
                                    continue
                                valid += 1
                                best = _fastest_fit(base, model, layout, node, capacity_gib, hw, extra, first_fit,
                                                    shape, fixed_split, bf16_only, other)
                                if best is None:
                                    too_big.append(_overrides(*shape, (True, may_recompute, True), fixed_split,
                                                              other and "alltoall"))
                                    break  # a larger micro-batch needs more memory still
                                found.append(best)
                                if first_fit:
                                    return SearchResult([best], valid, world, too_big)
    found.sort(key=lambda c: -c.speed.tokens_per_s_per_gpu)
    return SearchResult(found, valid, world, too_big)


def _fastest_fit(base: Recipe, model: ModelDims, layout: Layout, node: int, capacity: float, hw: Hardware,
                 extra: dict, first_fit: bool, shape: tuple, fixed_split: bool, bf16_only: bool,
                 other_dispatcher: str | None = None) -> Candidate | None:
    """The fastest memory options under which this layout fits, or None; then, where
    `other_dispatcher` is given (`base` has the all-to-all), that dispatcher instead if it is
    faster and fits under the same options (the dispatchers differ in exchange time and a
    one-layer buffer, not in what the options save).

    Recompute and offload trade speed for memory in ways that depend on the model, so each
    mix of them is estimated; bf16 gradient buffers change the numerics, so they are taken only
    where fp32 ones do not fit (or the recipe already asks for them)."""
    def fits(recipe: Recipe, options: tuple) -> Memory | None:
        """The fullest stage's memory under these options, or None where some stage overflows."""
        bf16_grads, recompute, offload = options
        key = (recipe.model.override_config.moe_config.token_dispatcher, recompute)
        if key not in memories:
            memories[key] = stage_memories(_with_options(recipe, (False, recompute, False)), model, layout,
                                           capacity, **extra)
        stages = memories[key]
        totals = [m.total - (m.grads / 2 if bf16_grads else 0) - (m.optimizer if offload else 0) for m in stages]
        if max(totals) > capacity - 1e-9:  # (validate recomputes it: no tie may flip)
            return None
        fullest = stages[max(range(len(stages)), key=totals.__getitem__)]
        return dataclasses.replace(
            fullest, grads=fullest.grads / (2 if bf16_grads else 1), optimizer=0.0 if offload else fullest.optimizer,
            optimizer_on_host=fullest.optimizer if offload else 0.0)

    def candidate(options: tuple, memory: Memory, speed: Speed, dispatcher: str | None) -> Candidate:
        return Candidate(overrides=_overrides(*shape, options, fixed_split, dispatcher), layout=layout,
                         memory=memory, speed=speed, options=_option_names(options, bf16_only))

    memories = {}  # by dispatcher and recompute, with fp32 gradient buffers (bf16 ones take half of that)
    best = best_options = None
    mixes = [(True, True)] if first_fit else [(False, False), (True, False), (False, True), (True, True)]
    if base.megatron.overlap_moe_expert_parallel_comm:  # megatron-core's combined schedule refuses recompute
        mixes = [(False, True)] if first_fit else [(False, False), (False, True)]
    for recompute, offload in mixes:
        for bf16_grads in ((True,) if bf16_only or first_fit else (False, True)):
            memory = fits(base, (bf16_grads, recompute, offload))
            if memory is not None:
                break
        else:
            continue
        options = (bf16_grads, recompute, offload)
        speed = estimate_speed(_with_options(base, options), model, layout, hw, node)
        if best is None or speed.tokens_per_s_per_gpu > best.speed.tokens_per_s_per_gpu:
            best, best_options = candidate(options, memory, speed, other_dispatcher and "alltoall"), options
        if not (recompute or offload):
            break  # neither option is needed, and each only adds time
    if best is None or other_dispatcher is None:
        return best
    other = _with_dispatcher(base, other_dispatcher)
    speed = estimate_speed(_with_options(other, best_options), model, layout, hw, node)
    if speed.tokens_per_s_per_gpu > best.speed.tokens_per_s_per_gpu:
        memory = fits(other, best_options)
        if memory is not None:
            return candidate(best_options, memory, speed, other_dispatcher)
    return best


def _with_dispatcher(recipe: Recipe, dispatcher: str | None) -> Recipe:
    if dispatcher is None:
        return recipe
    moe = dataclasses.replace(recipe.model.override_config.moe_config, token_dispatcher=dispatcher)
    override = dataclasses.replace(recipe.model.override_config, moe_config=moe)
    return dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, override_config=override))


def _variant(recipe: Recipe, tp, cp, pp, vpp, ep, etp, mbs, options) -> Recipe:
    meg = dataclasses.replace(
        recipe.megatron, tensor_model_parallel_size=tp, context_parallel_size=cp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None, expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp, sequence_parallel=tp > 1,
        num_layers_in_first_pipeline_stage=None, num_layers_in_last_pipeline_stage=None)
    data = dataclasses.replace(recipe.data, micro_batch_size=mbs)
    return _with_options(dataclasses.replace(recipe, megatron=meg, data=data), options)


def _with_options(recipe: Recipe, options) -> Recipe:
    bf16_grads, recompute, offload = options
    meg, model = recipe.megatron, recipe.model
    if meg.grad_reduce_in_fp32 == bf16_grads or meg.optimizer_offload != offload:
        meg = dataclasses.replace(meg, grad_reduce_in_fp32=not bf16_grads, optimizer_offload=offload)
    if model.enable_gradient_checkpointing != recompute:
        model = dataclasses.replace(model, enable_gradient_checkpointing=recompute)
    if meg is recipe.megatron and model is recipe.model:
        return recipe
    return dataclasses.replace(recipe, megatron=meg, model=model)


def _option_names(options, bf16_in_recipe: bool) -> tuple[str, ...]:
    bf16_grads, recompute, offload = options
    return tuple(name for on, name in [(bf16_grads and not bf16_in_recipe, "megatron.grad_reduce_in_fp32=false"),
                                       (recompute, "model.enable_gradient_checkpointing=true"),
                                       (offload, "megatron.optimizer_offload=true")] if on)


def _overrides(tp, cp, pp, vpp, ep, etp, mbs, options, fixed_split: bool, dispatcher: str | None = None
               ) -> tuple[str, ...]:
    bf16_grads, recompute, offload = options
    m = "megatron."
    out = [f"{m}tensor_model_parallel_size={tp}", f"{m}pipeline_model_parallel_size={pp}",
           f"{m}virtual_pipeline_model_parallel_size={vpp if vpp > 1 else 'null'}",
           f"{m}expert_model_parallel_size={ep}", f"{m}expert_tensor_parallel_size={etp}",
           f"{m}context_parallel_size={cp}", f"{m}sequence_parallel={str(tp > 1).lower()}"]
    if fixed_split:  # a split the recipe fixed for its own PP would not fit another; the planner picks one
        out += [f"{m}num_layers_in_first_pipeline_stage=null", f"{m}num_layers_in_last_pipeline_stage=null"]
    out += [f"data.micro_batch_size={mbs}", f"model.enable_gradient_checkpointing={str(recompute).lower()}",
            f"{m}optimizer_offload={str(offload).lower()}", f"{m}grad_reduce_in_fp32={str(not bf16_grads).lower()}"]
    if dispatcher is not None:
        out.append(f"model.override_config.moe_config.token_dispatcher={dispatcher}")
    return tuple(out)


def fewest_nodes(recipe: Recipe, cluster: Cluster, model: ModelDims, max_nodes: int) -> tuple[int, Candidate] | None:
    """The fewest nodes (above the recipe's) on which some layout fits, with every memory option on."""
    for nodes in range(recipe.trainer.nnodes + 1, max_nodes + 1):
        bigger = dataclasses.replace(recipe, trainer=dataclasses.replace(recipe.trainer, nnodes=nodes))
        result = search_layouts(bigger, cluster, model, first_fit=True)
        if result.candidates:
            return nodes, result.candidates[0]
    return None
