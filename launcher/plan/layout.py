"""megatron-core's parallel layout rules as pure functions.

megatron-core folds one set of GPUs two ways (parallel_state.initialize_model_parallel):
  attention and dense layers:  TP x CP x DP x PP = world size
  MoE expert layers:           ETP x EP x EDP x PP = world size
so EP is not a factor of the world size next to TP and DP (the seed README's
`GPUs = TP x PP x EP x DP` is wrong). On top of that: experts divide by EP, attention
heads and query groups by TP, MoE with TP > 1 needs sequence parallelism, a layer count
that PP does not divide needs an uneven first/last stage, and the global batch must be a
whole number of micro-batches on every data-parallel rank.

`plan_layout` collects every broken rule as one line naming the recipe keys and values,
and a valid value to try where one exists.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from launcher.errors import UserError
from launcher.plan.models import ModelDims
from launcher.recipe import Recipe

M = "megatron."


@dataclass(frozen=True)
class Layout:
    world_size: int
    tp: int
    pp: int
    ep: int
    etp: int
    cp: int
    dp: int  # data-parallel replicas of the attention/dense part
    edp: int  # data-parallel replicas of each expert
    vpp: int
    sequence_parallel: bool
    stage_layers: tuple[int, ...]  # transformer layers on each pipeline stage, first to last
    num_microbatches: int  # per optimizer step, on each data-parallel rank
    warnings: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict:
        return {
            "world_size": self.world_size, "tp": self.tp, "pp": self.pp, "ep": self.ep,
            "etp": self.etp, "cp": self.cp, "dp": self.dp, "edp": self.edp, "vpp": self.vpp,
            "sequence_parallel": self.sequence_parallel, "layers_per_stage": list(self.stage_layers),
            "num_microbatches": self.num_microbatches,
        }


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def nearest(value: int, candidates) -> int | None:
    """The candidate closest to value (the smaller one on a tie)."""
    candidates = sorted(candidates)
    return min(candidates, key=lambda c: (abs(c - value), c)) if candidates else None


def plan_layout(recipe: Recipe, model: ModelDims, gpus_per_node: int | None = None) -> Layout:
    """The layout of `recipe` for `model`, or a UserError listing every rule it breaks.

    Also fills in the uneven pipeline split on `recipe.megatron` when PP does not divide
    the layers and the recipe left the split to the planner.
    """
    meg = recipe.megatron
    world = recipe.world_size
    tp, pp, cp = meg.tensor_model_parallel_size, meg.pipeline_model_parallel_size, meg.context_parallel_size
    ep, etp = meg.expert_model_parallel_size, meg.expert_tensor_parallel_size
    vpp = meg.virtual_pipeline_model_parallel_size or 1
    problems: list[str] = []
    warnings: list[str] = []
    world_text = (f"trainer.nnodes x trainer.n_gpus_per_node = {recipe.trainer.nnodes} x "
                  f"{recipe.trainer.n_gpus_per_node} = {world} GPUs")

    # Attention side: TP x CP x PP must divide the world; DP is what is left.
    model_size = tp * cp * pp
    if world % model_size:
        fits_pp = [p for p in divisors(world // (tp * cp)) if p <= model.num_layers] if world % (tp * cp) == 0 else []
        hint = (f"; try {M}pipeline_model_parallel_size={nearest(pp, fits_pp)}" if fits_pp else
                f"; use a GPU count that is a multiple of {model_size}")
        problems.append(f"{world_text}, not a multiple of {M}tensor_model_parallel_size x "
                        f"context_parallel_size x pipeline_model_parallel_size = {tp} x {cp} x {pp} = {model_size}"
                        + hint)
    dp = max(world // model_size, 1)

    # Expert side: ETP x EP x PP must divide the world; EDP is what is left.
    expert_size = etp * ep * pp
    if world % expert_size:
        room = world // (etp * pp) if world % (etp * pp) == 0 else 0
        good_ep = [e for e in divisors(room) if model.num_experts % e == 0] if room else []
        hints = []
        if etp > 1 and world % (ep * pp) == 0 and model.num_experts % ep == 0:
            hints.append(f"{M}expert_tensor_parallel_size=1")
        if good_ep:
            hints.append(f"{M}expert_model_parallel_size={nearest(ep, good_ep)}")
        problems.append(
            f"{world_text}, not a multiple of {M}expert_tensor_parallel_size x expert_model_parallel_size x "
            f"pipeline_model_parallel_size = {etp} x {ep} x {pp} = {expert_size} (megatron-core folds the "
            f"same GPUs as ETP x EP x expert-DP x PP)" + (f"; try {' or '.join(hints)}" if hints else ""))
    edp = max(world // expert_size, 1)

    if model.num_experts % ep:
        room = world // (etp * pp) if world % (etp * pp) == 0 else world
        good = [e for e in divisors(model.num_experts) if room % e == 0]
        problems.append(f"{M}expert_model_parallel_size={ep} does not divide the model's {model.num_experts} experts; "
                        f"try {M}expert_model_parallel_size={nearest(ep, good)}")

    # Tensor parallelism splits heads, query groups and the MLP widths.
    # Query groups may also be fewer than TP ranks when TP is a multiple of them (the key/value
    # heads are then replicated), as TransformerConfig allows.
    def groups_ok(t: int) -> bool:
        return model.mla or model.num_kv_heads % t == 0 or t % model.num_kv_heads == 0

    if model.num_heads % tp or not groups_ok(tp):
        what = (f"{model.num_heads} attention heads" if model.mla else
                f"{model.num_heads} attention heads and be a multiple or divisor of its "
                f"{model.num_kv_heads} query groups")
        good = [t for t in divisors(model.num_heads) if groups_ok(t) and world % t == 0]
        problems.append(f"{M}tensor_model_parallel_size={tp} must divide the model's {what}; "
                        f"try {M}tensor_model_parallel_size={nearest(tp, good)}")
    if model.num_layers > model.num_moe_layers and model.dense_ffn % tp:
        problems.append(f"{M}tensor_model_parallel_size={tp} must divide the dense MLP width {model.dense_ffn}")
    if model.moe_ffn % etp:
        good = [t for t in divisors(model.moe_ffn) if t <= etp]
        problems.append(f"{M}expert_tensor_parallel_size={etp} must divide the expert width {model.moe_ffn}; "
                        f"try {M}expert_tensor_parallel_size={max(good)}")
    if tp > 1 and not meg.sequence_parallel:
        problems.append(f"{M}sequence_parallel=false with {M}tensor_model_parallel_size={tp}: megatron-core's MoE "
                        f"layer refuses to train with TP > 1 without sequence parallelism; set {M}sequence_parallel=true")
    if gpus_per_node and tp > gpus_per_node:
        warnings.append(f"{M}tensor_model_parallel_size={tp} spans nodes ({gpus_per_node} GPUs each): "
                        "tensor-parallel traffic crosses the network on every layer")
    if gpus_per_node and etp * ep > gpus_per_node:
        warnings.append(f"expert parallelism ETP x EP = {etp * ep} spans nodes ({gpus_per_node} GPUs each): "
                        "the token all-to-all crosses the network")

    # Sequence length: CP splits it in 2 x CP chunks (load balancing), SP over TP.
    seq_multiple = (2 * cp if cp > 1 else 1) * (tp if meg.sequence_parallel else 1)
    if recipe.data.max_length % seq_multiple:
        up = -(-recipe.data.max_length // seq_multiple) * seq_multiple
        why = " and ".join(([f"2 x {M}context_parallel_size={cp}"] if cp > 1 else [])
                           + ([f"{M}tensor_model_parallel_size={tp} with sequence parallelism"]
                              if meg.sequence_parallel else []))
        problems.append(f"data.max_length={recipe.data.max_length} must be a multiple of {seq_multiple} "
                        f"({why}); try data.max_length={up}")

    stage_layers = _pipeline_split(recipe, model, pp, vpp, problems)

    # Batch: a whole number of micro-batches on each data-parallel rank.
    mbs, gbs = recipe.data.micro_batch_size, recipe.data.global_batch_size
    step = mbs * dp
    num_microbatches = max(gbs // step, 1)
    if gbs % step:
        up = -(-gbs // step) * step
        problems.append(f"data.global_batch_size={gbs} is not a multiple of data.micro_batch_size x DP = "
                        f"{mbs} x {dp} = {step}; try data.global_batch_size={up}")
    elif vpp > 1 and num_microbatches % pp:
        problems.append(f"{M}virtual_pipeline_model_parallel_size={vpp} needs the micro-batches per step "
                        f"({num_microbatches}) to be a multiple of PP={pp}; raise data.global_batch_size")
    elif pp > 1 and num_microbatches < pp:
        warnings.append(f"{num_microbatches} micro-batches per step with PP={pp}: most of each step is pipeline "
                        f"bubble; raise data.global_batch_size to at least {pp * step}")

    if meg.overlap_moe_expert_parallel_comm:
        problems.extend(_a2a_overlap_problems(recipe, model, ep, pp, vpp))

    if problems:
        raise UserError(*problems)
    return Layout(world_size=world, tp=tp, pp=pp, ep=ep, etp=etp, cp=cp, dp=dp, edp=edp, vpp=vpp,
                  sequence_parallel=meg.sequence_parallel, stage_layers=stage_layers,
                  num_microbatches=num_microbatches, warnings=tuple(warnings))


def _a2a_overlap_problems(recipe: Recipe, model: ModelDims, ep: int, pp: int, vpp: int) -> list[str]:
    """megatron-core's conditions for its combined schedule (TransformerConfig refuses the rest)."""
    key = f"{M}overlap_moe_expert_parallel_comm=true"
    problems = []
    if ep == 1:
        problems.append(f"{key} hides the expert all-to-all, which needs {M}expert_model_parallel_size > 1; "
                        "set it false or raise EP")
    dispatcher = recipe.model.override_config.moe_config.token_dispatcher
    if dispatcher != "alltoall":
        problems.append(f"{key} needs the alltoall token dispatcher; model.override_config.moe_config."
                        f"token_dispatcher is {dispatcher}: set it to alltoall")
    if recipe.model.enable_gradient_checkpointing:
        problems.append(f"{key} runs no full recompute; set model.enable_gradient_checkpointing=false")
    if pp > 1 and vpp == 1:
        problems.append(f"{key} with {M}pipeline_model_parallel_size={pp} needs virtual pipeline stages; "
                        f"set {M}virtual_pipeline_model_parallel_size=2")
    if recipe.model.enable_mtp and (model.mtp_layers > 1 or pp == 1):
        problems.append(f"{key} with multi-token prediction needs one prediction layer (the model has "
                        f"{model.mtp_layers}) and {M}pipeline_model_parallel_size > 1; set model.enable_mtp=false")
    return problems


def _pipeline_split(recipe: Recipe, model: ModelDims, pp: int, vpp: int, problems: list[str]) -> tuple[int, ...]:
    """Layers per pipeline stage, checked as megatron-core's TransformerConfig checks them."""
    meg = recipe.megatron
    layers = model.num_layers
    if vpp > 1 and pp == 1:
        problems.append(f"{M}virtual_pipeline_model_parallel_size={vpp} needs {M}pipeline_model_parallel_size > 1")
    if pp > layers:
        problems.append(f"{M}pipeline_model_parallel_size={pp} exceeds the model's {layers} layers")
        return (1,) * pp
    first, last = meg.num_layers_in_first_pipeline_stage, meg.num_layers_in_last_pipeline_stage
    if first is None and last is None:
        if layers % (pp * vpp) == 0:
            return (layers // pp,) * pp
        first, last = uneven_split(layers, pp, vpp)
        if first is None:
            problems.append(f"{layers} layers cannot be split over {M}pipeline_model_parallel_size={pp}"
                            + (f" x virtual {vpp}" if vpp > 1 else "") + "; choose a PP that divides them")
            return (1,) * pp
        meg.num_layers_in_first_pipeline_stage, meg.num_layers_in_last_pipeline_stage = first, last
    fixed = [n for n in (first, last) if n is not None]
    if any(n < 1 for n in fixed) or pp == 1:
        problems.append(f"{M}num_layers_in_first/last_pipeline_stage need {M}pipeline_model_parallel_size > 1 "
                        "and at least 1 layer each")
        return (layers,)
    middle_stages = pp - len(fixed)
    middle_layers = layers - sum(fixed)
    if bool(middle_stages) != bool(middle_layers) or (middle_stages and middle_layers % middle_stages) \
            or middle_layers < 0 or any(n % vpp for n in fixed) \
            or (middle_stages and (middle_layers // middle_stages) % vpp):
        problems.append(f"{M}num_layers_in_first_pipeline_stage={first}, num_layers_in_last_pipeline_stage={last}: "
                        f"the other {middle_layers} of {layers} layers do not split evenly over {middle_stages} "
                        f"middle stages" + (f" in chunks of {vpp}" if vpp > 1 else ""))
        return (1,) * pp
    per = middle_layers // middle_stages if middle_stages else 0
    stages = [per] * pp
    if first is not None:
        stages[0] = first
    if last is not None:
        stages[-1] = last
    return tuple(stages)


def uneven_split(layers: int, pp: int, vpp: int = 1) -> tuple[int | None, int | None]:
    """First and last stage sizes that let the middle stages hold equal shares.

    The end stages also hold the embedding and the output layer, so they take no more
    layers than a middle stage; the last (logits and loss) takes the smaller share.
    """
    if pp == 2:
        first = layers // 2 - (layers // 2) % vpp
        rest = layers - first
        return (first, None) if first >= vpp and rest % vpp == 0 else (None, None)
    for per in range(-(-layers // pp), 0, -1):
        if per % vpp:
            continue
        rest = layers - per * (pp - 2)
        if rest < 2 * vpp:
            continue
        last = (rest // 2) - (rest // 2) % vpp
        first = rest - last
        if last >= vpp and first % vpp == 0 and first <= per + vpp:
            return first, last
    return None, None
