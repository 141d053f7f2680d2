"""Estimated step time of a layout: compute, communication, pipeline bubble, optimizer.

A model a reader can check by hand (README, "How the search estimates speed"). Per optimizer
step, on the slowest pipeline stage of one GPU:

- compute: the stage's FLOPs (6 x matmul parameters per token, plus causal attention over
  full rows, x 4/3 with full recompute) spread evenly over the TP x CP GPUs of a replica, at
  the GPU's peak times the utilisation the trainer measured (`Hardware.mfu`, or `te_mfu` on
  transformer-engine's path, which the jobs of the project's image run); the routed
  experts' grouped products lose efficiency as the tokens per expert shrink
  (t / (t + EXPERT_TOKENS_HALF)); under dropless expert parallelism every MoE layer waits for
  its busiest EP rank, whose routed tokens (and, with the all-to-all, bytes received) are
  ROUTED_LOAD times an even share; plus a fixed host time per layer and micro-batch (the
  trainer launches its kernels from Python);
- communication, not overlapped with compute except where the recipe turns on megatron-core's
  DDP overlap (below): EP all-to-all of the routed tokens (4 per MoE layer and micro-batch, and
  the host's wait for their counts unless the experts are padded to capacity) or, with the
  all-gather dispatcher, every token gathered to every EP rank and the outputs reduced back, TP/SP
  all-gathers and reduce-scatters (3 per attention block and per TP-split MLP: megatron-core
  runs the column-parallel backward's two under its GEMMs), CP's key/value
  all-gather and its gradient's reduce-scatter (with transformer-engine, plus a fixed time per
  step of its ring), PP's activations between stages, and once per
  step the distributed optimizer's gradient reduce-scatter and parameter all-gather over
  data-parallel ranks; over NVLink while the group stays inside a node, else the network.
  megatron.overlap_grad_reduce hides the reduce-scatter under the last micro-batch's backward
  (2/3 of its compute) and overlap_param_gather the all-gather under the first one's forward
  (1/3); what is longer than that stays exposed;
- PP bubble: (PP - 1) / VPP micro-batch times on top of the micro-batches of the step (1F1B);
- optimizer: Adam over this GPU's shard from GPU memory, or with optimizer_offload over PCIe
  and the host's CPU.
With LoRA the frozen weights' gradients are never computed (4 of the 6 FLOPs per parameter
and token remain) and only the adapters are reduced and updated.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace

from launcher.cluster import Cluster
from launcher.plan.layout import Layout
from launcher.plan.memory import busiest_rank_share, expert_padding, stage_adapter_params, stage_params
from launcher.plan.models import ModelDims
from launcher.recipe import Recipe

EXPERT_TOKENS_HALF = 256  # tokens per expert at which a grouped product runs at half its best
EXPERT_WIDTH_HALF = 256  # an expert's FFN width per ETP rank at which it runs at half its best
# The busiest EP rank's routed tokens over an even split's (trainer.routing.expert_parallel_load)
# that routers trained with their auxiliary loss settled at: the median of three runs of 120
# steps, 1.07, 1.09 and 1.27 over their last 20 (bench/results/router_load_h200x4.json). Experts
# padded to capacity take the same tokens on every rank, and forced balancing spreads them evenly.
ROUTED_LOAD = 1.09
ADAM_BYTES_PER_PARAM = 32  # read grad (4), master, m, v (12) and write them back (12), write bf16 weight (2), slack


@dataclass(frozen=True)
class Hardware:
    name: str
    peak_tflops: float  # dense bf16, the vendor's figure
    mfu: float  # of the peak, what the trainer's matmuls reach (bench/results, one GPU, long rows)
    te_mfu: float  # the same with transformer-engine (its layer spec, cuDNN attention on long rows)
    layer_overhead_ms: float  # host time per layer per micro-batch, forward and backward
    collective_ms: float  # fixed time of one collective inside a node (launch, latency, the stream waits); x2 across
    ep_sync_ms: float  # per MoE layer and micro-batch under EP: the host reads the token counts before the all-to-all
    hbm_tb_s: float
    nvlink_gb_s: float  # per GPU, achieved by collectives inside a node
    network_gb_s: float  # per GPU, achieved across nodes (400 Gb/s InfiniBand per GPU)
    host_gb_s: float  # PCIe to host memory, per GPU
    host_adam_gparams_s: float  # CPU Adam throughput per GPU's share of the host
    # transformer-engine's context parallelism passes key/value chunks round a ring of the CP
    # ranks, with an attention call and a merge of partial results per step: this much per layer
    # and micro-batch for each ring step after the first, forward and backward together
    te_cp_ring_ms: float
    transformer_engine: bool = False  # the path the jobs run (hardware() decides from the profile)


# Measured (bench/results/layouts_check.json, `bench/layouts.py compare`): mfu and layer
# overhead fitted on one GPU of each kind (qwen3_moe_8l, one long sample per row, micro-batches 2
# to 8); the collective and EP sync times on the multi-GPU rows of every TE-free machine together
# (ep_sync_ms since the busiest rank's load is charged: 1.0, before 1.5); te_mfu and
# te_cp_ring_ms on one machine of two H200s with transformer-engine (its one-GPU row, then its CP=2
# row), and the H100's te_mfu scaled from it by the H200's ratio (not measured). Peaks, memory,
# NVLink, network and PCIe figures are the datasheets' at the fraction collectives reach.
GPUS = {
    "H100": Hardware("H100", 989.0, 0.38, 0.49, 2.25, 0.8, 1.0, 3.35, 300.0, 40.0, 25.0, 0.5, 2.75),
    "H200": Hardware("H200", 989.0, 0.41, 0.53, 2.5, 0.8, 1.0, 4.8, 300.0, 40.0, 25.0, 0.5, 2.75),
    "A100": Hardware("A100", 312.0, 0.38, 0.49, 2.25, 0.8, 1.0, 2.0, 200.0, 20.0, 20.0, 0.5, 2.75),  # H100's, untested
    "B200": Hardware("B200", 2250.0, 0.38, 0.49, 2.5, 0.8, 1.0, 8.0, 600.0, 40.0, 50.0, 0.5, 2.75),  # likewise
}
DEFAULT_GPU = "H100"


def hardware(cluster: Cluster) -> Hardware:
    """The table's entry whose name appears in the profile's gpu_type (H100 when none does),
    for the path the profile's jobs run: transformer-engine where they run the project's image
    (Slurm and Kubernetes GPU clusters) unless `hardware.transformer_engine` says otherwise;
    `mfu` is then the path's. The figures the profile's `hardware` section gives go over it."""
    gpu_type = cluster.gpu_type or ""
    name = next((n for n in GPUS if n.lower() in gpu_type.lower()), DEFAULT_GPU)
    given = {k: v for k, v in dataclasses.asdict(cluster.hardware).items() if v is not None}
    te = given.pop("transformer_engine", cluster.backend in ("slurm", "kubernetes") and not cluster.on_cpu)
    table = GPUS[name]
    return replace(table, **{"transformer_engine": te, "mfu": table.te_mfu if te else table.mfu, **given})


@dataclass(frozen=True)
class Speed:
    step_s: float
    tokens_per_s_per_gpu: float
    parts: dict  # seconds per step by cost: compute, ep_alltoall, tp_comm, cp_comm, pp_bubble, ...

    @property
    def bottleneck(self) -> str:
        return max(self.parts, key=self.parts.get)


def flops_per_token(model: ModelDims, seq: int, moe: bool) -> tuple[float, float]:
    """(dense, expert) training FLOPs of one layer for one token: 6 per matmul parameter, and
    causal attention over a full row of `seq` tokens (a token attends to seq / 2 keys)."""
    attn_tp, attn_rep = model.attention_params()
    if model.mla:
        qk, v, heads = model.qk_nope_dim + model.qk_rope_dim, model.v_head_dim, model.num_heads
    else:
        qk = v = model.head_dim
        heads = model.num_heads
    attention = 6 * (attn_tp + attn_rep) + 6 * heads * (qk + v) * seq / 2
    if not moe:
        return attention + 6 * model.dense_mlp_params(), 0.0
    router = 6 * model.num_experts * model.hidden
    shared = 6 * model.shared_expert_params()
    return attention + router + shared, 6 * model.topk * model.expert_params()


def estimate_speed(recipe: Recipe, model: ModelDims, layout: Layout, hw: Hardware, gpus_per_node: int,
                   routed_load: float = ROUTED_LOAD) -> Speed:
    """`routed_load`: the busiest EP rank's share of routed tokens over an even one, where a
    measured run knows it."""
    seq, mbs = recipe.data.max_length, recipe.data.micro_batch_size
    tp, cp, pp, ep, etp = layout.tp, layout.cp, layout.pp, layout.ep, layout.etp
    bf16 = 2
    peak = hw.peak_tflops * 1e12 * hw.mfu
    node = max(gpus_per_node, 1)

    def link(group_span: int) -> tuple[float, float]:  # (bytes/s, latency) for a group this wide
        if group_span <= node:
            return hw.nvlink_gb_s * 1e9, hw.collective_ms / 1e3
        return hw.network_gb_s * 1e9, 2 * hw.collective_ms / 1e3

    def collective(nbytes: float, ranks: int, span: int, count: int) -> float:
        if ranks == 1:
            return 0.0
        bw, latency = link(span)
        return count * (nbytes * (ranks - 1) / ranks / bw + latency)

    def expert_exchange(hidden_bytes: float, n_moe: int) -> float:
        """EP's exchange of one micro-batch's routed tokens over the MoE layers, forward and backward.
        all-to-all: each routed copy to its expert's rank and back (4 collectives a layer).
        all-gather (over the ETP x EP ranks): every token to every rank, the partial sums
        reduced back in bf16 (trainer.model.dispatch). Either way the host waits for the counts
        once a layer unless the experts are padded to capacity."""
        if dispatcher == "alltoall":
            exchange = collective(hidden_bytes * model.topk * busiest, ep, etp * ep, 4 * n_moe)
        else:
            exchange = collective(hidden_bytes * etp * ep, etp * ep, etp * ep, 4 * n_moe)
        return exchange + (0.0 if padded else n_moe * hw.ep_sync_ms / 1e3)

    tokens = mbs * seq  # one micro-batch of one data-parallel replica
    rank_tokens = tokens / (cp * (tp if layout.sequence_parallel else 1))  # hidden states a rank holds
    padding = expert_padding(recipe)  # padded to capacity: more copies, sizes known without the host's wait
    padded = recipe.model.override_config.moe_config.pad_to_capacity
    dispatcher = recipe.model.override_config.moe_config.token_dispatcher
    busiest = busiest_rank_share(recipe, layout, routed_load)  # routed copies on the busiest EP rank, over an even share
    per_expert = tokens / cp * model.topk * padding * ep * etp / (tp * model.num_experts)
    width = model.moe_ffn / etp
    expert_eff = per_expert / (per_expert + EXPERT_TOKENS_HALF) * width / (width + EXPERT_WIDTH_HALF)
    dense_moe, expert_moe = flops_per_token(model, seq, True)
    dense_plain, _ = flops_per_token(model, seq, False)
    recompute = 4 / 3 if recipe.model.enable_gradient_checkpointing else 1.0
    # LoRA: the frozen base's weight gradients are never computed, 2 of each weight's 6 FLOPs a
    # token (the adapters' own are a rank's worth: left out); embedding and head stay as they are
    frozen = 4 / 6 if recipe.model.lora.enabled else 1.0
    moe_set = set(model.moe_layers)
    mtp = model.mtp_layers if recipe.model.enable_mtp else 0
    kv_width = (model.num_heads * (model.qk_nope_dim + model.qk_rope_dim + model.v_head_dim) if model.mla
                else 2 * model.num_kv_heads * model.head_dim) / tp

    stage_times, parts = [], []
    start = 0
    for stage, count in enumerate(layout.stage_layers):
        layers = range(start, start + count)
        start += count
        n_moe = len(moe_set.intersection(layers)) + (mtp if stage == pp - 1 else 0)
        n_dense = count - len(moe_set.intersection(layers))
        flops_dense = tokens * (n_moe * dense_moe + n_dense * dense_plain) * recompute * frozen
        flops_expert = tokens * n_moe * expert_moe * busiest * recompute * frozen
        if stage == pp - 1:  # output layer(s) and loss
            flops_dense += tokens * (1 + mtp) * 6 * model.hidden * model.vocab
        compute = (flops_dense + flops_expert / expert_eff) / (tp * cp) / peak
        compute += (n_moe + n_dense) * hw.layer_overhead_ms / 1e3 * recompute  # (recompute launches the forward again)
        n_layers = n_moe + n_dense
        hidden_bytes = tokens / cp * model.hidden * bf16
        # a TP-split block (attention, dense or shared MLP) exposes 3 of its 5 collectives: the
        # forward's all-gather and reduce-scatter and the backward's gradient all-gather; the
        # column-parallel backward's all-gather and reduce-scatter run under its GEMMs. Expert
        # TP adds the all-to-all dispatcher's all-gather and reduce-scatter, forward and backward
        # (the all-gather dispatcher's exchange spans the ETP ranks already).
        tp_comm = collective(hidden_bytes, tp, tp, 3 * n_layers + 3 * n_dense
                             + (4 * n_moe if etp > 1 and dispatcher == "alltoall" else 0)
                             + (3 * n_moe if model.shared_ffn else 0))
        ep_comm = expert_exchange(rank_tokens * model.hidden * bf16, n_moe) if ep > 1 else 0.0
        cp_comm = collective(tokens * kv_width * bf16, cp, tp * cp, 2 * n_layers)
        if hw.transformer_engine:  # its ring's steps, each a call, an exchange and a merge
            cp_comm += (cp - 1) * n_layers * hw.te_cp_ring_ms / 1e3
        pp_comm = collective(rank_tokens * model.hidden * bf16 * 2, 2, tp * cp * layout.dp * 2, 2) if pp > 1 else 0.0
        stage_parts = {"compute": compute, "ep_alltoall": ep_comm, "tp_comm": tp_comm, "cp_comm": cp_comm,
                       "pp_comm": pp_comm}
        parts.append(stage_parts)
        stage_times.append(sum(stage_parts.values()))

    slowest = max(range(pp), key=lambda k: stage_times[k])
    m = layout.num_microbatches
    per_step = {k: v * m for k, v in parts[slowest].items()}
    per_step["pp_bubble"] = (pp - 1) / layout.vpp * sum(stage_times) / pp if pp > 1 else 0.0

    # Once per step: gradient reduce-scatter and parameter all-gather, then Adam on the shard.
    dense, expert = stage_params(model, layout, slowest, mtp)
    if recipe.model.lora.enabled:  # only the adapters have gradients and optimizer states
        dense, expert = stage_adapter_params(recipe, model, layout, slowest)
    meg = recipe.megatron
    grad_bytes = 4 if meg.grad_reduce_in_fp32 else 2
    dense_group, expert_group = layout.dp * layout.cp, layout.edp
    reduce = (collective(dense * (grad_bytes + bf16), dense_group, tp * dense_group, 1)
              + collective(expert * (grad_bytes + bf16), expert_group, etp * ep * expert_group, 1))
    shard = dense / dense_group + expert / expert_group if meg.use_distributed_optimizer else dense + expert
    if meg.optimizer_offload:
        per_step["host_offload"] = (shard * (grad_bytes + bf16) / (hw.host_gb_s * 1e9)
                                    + shard / (hw.host_adam_gparams_s * 1e9))
    else:
        per_step["optimizer"] = shard * ADAM_BYTES_PER_PARAM / (hw.hbm_tb_s * 1e12)
    # overlapped: each part hides under the compute of one micro-batch's backward (2/3 of it,
    # the gradients' reduce-scatter) or forward (1/3, the weights' all-gather)
    micro_batch = parts[slowest]["compute"]
    gradients = reduce * grad_bytes / (grad_bytes + bf16)
    hidden = min(gradients, 2 / 3 * micro_batch) if meg.overlap_grad_reduce else 0.0
    if meg.overlap_param_gather and meg.use_distributed_optimizer:
        hidden += min(reduce - gradients, micro_batch / 3)
    per_step["grad_reduce"] = reduce - hidden
    step = sum(per_step.values())
    step_tokens = recipe.data.global_batch_size * seq
    return Speed(step_s=step, tokens_per_s_per_gpu=step_tokens / step / layout.world_size,
                 parts={k: round(v, 6) for k, v in per_step.items()})
