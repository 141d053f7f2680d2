"""Bytes per GPU for a layout: weights, gradients, optimizer states, activations.

The model, per pipeline stage (the report is the fullest stage):
- weights in bf16 (2 bytes); gradients in fp32 (4 bytes: megatron-core's DDP accumulates
  bf16 training's main grads in fp32), or bf16 with `megatron.grad_reduce_in_fp32: false`;
- Adam: fp32 master weights and two moments (12 bytes), sharded by the distributed
  optimizer over DP x CP for dense weights and over expert-DP for experts; moved to host
  memory by `megatron.optimizer_offload`;
- activations per micro-batch from the tensors each layer keeps for backward (bf16, with
  flash/SDPA attention, so nothing quadratic in the sequence), times the micro-batches the
  1F1B schedule keeps in flight on that stage (PP on the first stage); with
  `model.enable_gradient_checkpointing` (full recompute) a layer keeps only its input,
  plus one layer's working set during backward; the last stage adds the logits (without TP
  or MTP, the trainer's chunked output loss: a chunk of them, and the output weight's gradient);
- a fixed allowance for the CUDA context, NCCL buffers and allocator slack.
With LoRA (`model.lora.rank` > 0) the base weights are frozen: bf16 weights only, no gradients
or optimizer states; the adapters (launcher.plan.lora) have their weights, fp32 gradients and
Adam states, and their branches' activations add to each layer's.
`megatron.param_offload` and `grad_offload` move weights and gradients to host memory
between steps (checkpointing, validation); a step needs them on the GPU, so they do not
lower the peak counted here.
"""

from __future__ import annotations

from dataclasses import dataclass

from launcher.cluster import Cluster
from launcher.plan import lora as adapters
from launcher.plan.layout import Layout
from launcher.plan.models import ModelDims
from launcher.recipe import Recipe

GIB = 1024**3
LOGIT_ELEMENTS_PER_CHUNK = 2 ** 28  # logits a chunk of trainer.model.output_loss holds (512 MiB in bf16)
OVERHEAD_GIB = 4.0  # CUDA context, NCCL buffers, allocator fragmentation (measured later on H100)


@dataclass(frozen=True)
class Memory:
    params: float  # GiB per GPU, on the fullest pipeline stage
    grads: float
    optimizer: float
    activations: float
    overhead: float
    capacity: float  # GiB on one GPU (or host memory per process on CPU)
    stage: int  # which pipeline stage is fullest
    optimizer_on_host: float  # GiB per GPU moved to host memory by optimizer_offload
    params_per_gpu: int

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations + self.overhead

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity

    def to_dict(self) -> dict:
        r = lambda x: round(x, 2)  # noqa: E731
        return {"params": r(self.params), "grads": r(self.grads), "optimizer": r(self.optimizer),
                "activations": r(self.activations), "overhead": r(self.overhead), "total": r(self.total),
                "capacity": r(self.capacity), "stage": self.stage,
                "optimizer_on_host": r(self.optimizer_on_host)}


def padded_vocab(model: ModelDims, tp: int) -> int:
    """megatron-core pads the vocabulary to a multiple of 128 x TP."""
    step = 128 * tp
    return -(-model.vocab // step) * step


def stage_params(model: ModelDims, layout: Layout, stage: int, mtp: int = 0) -> tuple[float, float]:
    """(dense, expert) parameters held by one GPU of pipeline stage `stage`; `mtp`
    multi-token-prediction layers (MoE layers with two norms and a 2h -> h projection) sit on
    the last stage, as megatron-core places them."""
    start = sum(layout.stage_layers[:stage])
    layers = range(start, start + layout.stage_layers[stage])
    moe = len(set(layers).intersection(model.moe_layers))
    dense_layers = len(layers) - moe
    attn_tp, attn_rep = model.attention_params()
    tp = layout.tp
    if stage == layout.pp - 1 and mtp:
        moe += mtp
        layers = range(len(layers) + mtp)  # the MTP layers' attention too
    dense = len(layers) * (attn_tp / tp + attn_rep)
    if stage == layout.pp - 1:
        dense += mtp * (2 * model.hidden * model.hidden / tp + 3 * model.hidden)
    dense += dense_layers * (model.dense_mlp_params() / tp + model.hidden)
    dense += moe * (model.shared_expert_params() / tp + model.moe_replicated_params())
    embedding = padded_vocab(model, tp) * model.hidden / tp
    if stage == 0:
        dense += embedding
    if stage == layout.pp - 1:
        dense += model.hidden + (embedding if (not model.tied_embeddings or layout.pp > 1) else 0)
    experts_here = model.num_experts // layout.ep
    expert = moe * experts_here * model.expert_params() / layout.etp
    return dense, expert


# Dropless routing under EP: the busiest rank's experts receive more than the even share of the
# routed tokens, by as much as the router decides. Memory allows a quarter more; measured on the
# benchmark model (bench/README.md), the busiest rank held 1.0x the even share under forced balance
# and, with its untrained router, what 1.2x (EP=2) and 1.5x (EP=4) would hold.
ROUTING_HEADROOM = 1.25


def expert_padding(recipe: Recipe) -> float:
    """Routed token copies per router choice: with pad_to_capacity every expert processes its
    full capacity (capacity_factor x its even share), however many tokens chose it."""
    moe = recipe.model.override_config.moe_config
    return moe.capacity_factor if moe.pad_to_capacity and moe.capacity_factor else 1.0


def busiest_rank_share(recipe: Recipe, layout: Layout, dropless: float = ROUTING_HEADROOM) -> float:
    """Routed token copies the fullest expert-parallel rank holds, over the even share: the
    padded capacity; with one EP rank all of them (exactly the even share), and about that
    where the router is forced to balance (random, even choices); else `dropless` (memory
    allows the headroom above, the speed estimate what trained routers reach), or less where
    a capacity factor caps every expert."""
    moe = recipe.model.override_config.moe_config
    if moe.pad_to_capacity or layout.ep == 1 or moe.force_load_balancing:
        return expert_padding(recipe)
    return min(dropless, moe.capacity_factor or dropless)


def layer_activation_bytes(model: ModelDims, layout: Layout, recipe: Recipe, moe: bool) -> float:
    """Bytes one layer keeps for backward, for one micro-batch, on one GPU."""
    s = recipe.data.max_length / layout.cp
    b = recipe.data.micro_batch_size
    h = model.hidden
    tp, etp = layout.tp, layout.etp
    tokens = s * b / (tp if layout.sequence_parallel else 1)  # tokens of hidden size on this rank
    if model.mla:
        q = model.num_heads * (model.qk_nope_dim + model.qk_rope_dim)
        kv = model.num_heads * (model.qk_nope_dim + model.qk_rope_dim + model.v_head_dim)
        latent = (model.q_lora_rank or 0) + model.kv_lora_rank + model.qk_rope_dim
        attn_out = model.num_heads * model.v_head_dim
        heads_part = s * b * (q + attn_out) / tp + s * layout.cp * b * kv / tp + s * b * latent
    else:
        q = model.num_heads * model.head_dim
        kv = 2 * model.num_kv_heads * model.head_dim
        heads_part = s * b * (q + q) / tp + s * layout.cp * b * kv / tp  # Q, K, V and the attention output
    # (with context parallelism each rank gathers the keys and values of the whole sequence)
    # layer input, norm output (the QKV input), projection input, residual
    attn = 2 * (tokens * 3 * h + heads_part)
    if moe:
        routed = tokens * model.topk * etp * busiest_rank_share(recipe, layout)  # copies this rank's experts process
        experts = routed * (2 * h + 3 * model.moe_ffn / etp)  # permuted in/out, fc1 (gate+up), act
        shared = s * b * 3 * model.shared_ffn / tp
        mlp = 2 * (tokens * 2 * h + experts + shared) + 4 * tokens * model.num_experts  # router probs fp32
    else:
        mlp = 2 * (tokens * 2 * h + s * b * 3 * model.dense_ffn / tp)
    lora = recipe.model.lora
    branches = adapters.layer_adapter_activations(model, lora, moe, s * b, s * b * model.topk) if lora.enabled else 0
    return attn + mlp + branches


def memory_budget(recipe: Recipe, cluster: Cluster) -> tuple[float, float]:
    """(capacity, fixed allowance) in GiB per GPU; on CPU clusters per process, out of the
    host memory the profile gives all processes together."""
    if cluster.on_cpu:
        return cluster.gpu_memory_gib / recipe.trainer.n_gpus_per_node, 0.5
    return cluster.gpu_memory_gib, OVERHEAD_GIB


def estimate_memory(recipe: Recipe, model: ModelDims, layout: Layout, capacity_gib: float,
                    overhead_gib: float = OVERHEAD_GIB) -> Memory:
    """The fullest pipeline stage's memory."""
    return max(stage_memories(recipe, model, layout, capacity_gib, overhead_gib), key=lambda m: m.total)


def stage_memories(recipe: Recipe, model: ModelDims, layout: Layout, capacity_gib: float,
                   overhead_gib: float = OVERHEAD_GIB) -> list[Memory]:
    """Memory per GPU of each pipeline stage, first to last."""
    meg = recipe.megatron
    stages = []
    for stage in range(layout.pp):
        dense, expert = stage_params(model, layout, stage, _mtp_layers(recipe, model))
        params = 2 * (dense + expert)
        if recipe.model.lora.enabled:  # the base is frozen: only the adapters train
            frozen = params
            dense, expert = stage_adapter_params(recipe, model, layout, stage)
            params = frozen + 2 * (dense + expert)
        grads = (4 if meg.grad_reduce_in_fp32 else 2) * (dense + expert)
        if meg.use_distributed_optimizer:
            optim = 12 * (dense / (layout.dp * layout.cp) + expert / layout.edp)
        else:
            optim = 12 * (dense + expert)
        on_host = optim if meg.optimizer_offload else 0.0
        if meg.optimizer_offload:
            optim = 0.0
        acts = _stage_activations(recipe, model, layout, stage)
        stages.append(Memory(params=params / GIB, grads=grads / GIB, optimizer=optim / GIB, activations=acts / GIB,
                             overhead=overhead_gib, capacity=capacity_gib, stage=stage,
                             optimizer_on_host=on_host / GIB, params_per_gpu=int(dense + expert)))
    return stages


def stage_adapter_params(recipe: Recipe, model: ModelDims, layout: Layout, stage: int) -> tuple[float, float]:
    """(dense, expert) LoRA adapter parameters one GPU of pipeline stage `stage` holds (the
    decoder's layers; multi-token-prediction layers are not adapted)."""
    start = sum(layout.stage_layers[:stage])
    dense = expert = 0.0
    for layer in range(start, start + layout.stage_layers[stage]):
        d, e = adapters.layer_adapter_params(model, recipe.model.lora, layer in model.moe_layers, layout.tp, layout.ep,
                                              layout.etp)
        dense, expert = dense + d, expert + e
    return dense, expert


def _stage_activations(recipe: Recipe, model: ModelDims, layout: Layout, stage: int) -> float:
    start = sum(layout.stage_layers[:stage])
    layers = range(start, start + layout.stage_layers[stage])
    mtp = _mtp_layers(recipe, model) if stage == layout.pp - 1 else 0
    moe = len(set(layers).intersection(model.moe_layers)) + mtp
    dense = len(layers) + mtp - moe
    per_layer = ([layer_activation_bytes(model, layout, recipe, True)] * moe
                 + [layer_activation_bytes(model, layout, recipe, False)] * dense)
    in_flight = min(layout.pp - stage, layout.num_microbatches) if layout.pp > 1 else 1
    s = recipe.data.max_length / layout.cp
    b = recipe.data.micro_batch_size
    if recipe.model.enable_gradient_checkpointing:
        kept_input = 2 * s * b * model.hidden / (layout.tp if layout.sequence_parallel else 1)
        acts = in_flight * len(per_layer) * kept_input + max(per_layer, default=0)
    else:
        acts = in_flight * sum(per_layer)
    moe_config = recipe.model.override_config.moe_config
    if moe and moe_config.token_dispatcher == "allgather" and layout.ep * layout.etp > 1:
        # the all-gather dispatcher's gathered tokens and the partial sums it reduces back (bf16:
        # trainer.model.dispatch), every rank of the group's tokens, one layer at a time
        rows = layout.ep * layout.etp * s * b / (layout.tp if layout.sequence_parallel else 1)
        acts += rows * model.hidden * 2 * 2
    if recipe.megatron.overlap_moe_expert_parallel_comm:
        # the combined schedule runs one micro-batch's forward through a layer before the other's
        # backward has freed that layer: one more layer's activations at the crossing
        acts += max(per_layer, default=0)
    if stage == layout.pp - 1:
        vocab = padded_vocab(model, layout.tp)
        if layout.tp == 1 and not mtp:
            # trainer.model.output_loss: the logits and their gradient a chunk at a time (bf16),
            # the output weight's gradient in fp32 and its bf16 copy (none under LoRA: frozen)
            weight_grad = 0 if recipe.model.lora.enabled else vocab * model.hidden * 6
            acts += 2 * 2 * min(s * b * vocab, LOGIT_ELEMENTS_PER_CHUNK) + weight_grad
        else:
            # bf16 logits and the fp32 copy the vocab-parallel cross-entropy works on (the MTP
            # layers compute their own)
            acts += (1 + mtp) * s * b * vocab / layout.tp * 6
    return acts


def _mtp_layers(recipe: Recipe, model: ModelDims) -> int:
    return model.mtp_layers if recipe.model.enable_mtp else 0
