"""The SFT loop: parallel state, model, optimizer, data, and the step, on one screen each.

    setup()       distributed init, megatron-core parallel state, seeds
    build()       this rank's model chunks in megatron-core DDP, optimizer, LR schedule
    train()       steps of forward/backward over micro-batches, optimizer step, logging (a
                  step's numbers during the next step, so the host never waits on the GPU),
                  validation and checkpoints; stops cleanly when asked to (SAVE_AND_EXIT)
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from functools import cache, partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from trainer import checkpoint, devices, gc_pauses, optimizer_step
from trainer.model import fused
from trainer.metrics import InFlight, MetricsLog, flops_per_token, peak_tflops
from trainer.profile import StepProfile
from trainer.routing import RoutingCounter, dropped_fraction, expert_parallel_load, per_layer

STOP_FILE = "SAVE_AND_EXIT"  # written by the Slurm script when the time limit is near


class CollectiveTimeout(RuntimeError):
    """A collective waited past trainer.collective_timeout_s: another rank hung or died."""


@dataclass
class Run:
    recipe: object
    run_dir: Path
    model: list  # model chunks (several with virtual pipeline parallelism)
    optimizer: object
    scheduler: object
    config: object
    dtype: torch.dtype

    def batch(self, rows) -> dict:
        """One micro-batch on the device (trainer.data.batches.collate)."""
        from trainer.data.batches import collate

        batch = collate(rows, devices.device(), attention_form(self.recipe), packing_align(self.recipe))
        samples = batch.get("packed_seq_params") or batch["attention_mask"]  # (thd, boundaries)
        if samples is not None and not self.config.multi_latent_attention and self.config.context_parallel_size == 1:
            from trainer.model.attention import prepare_block_mask

            prepare_block_mask(samples)
        return batch


def attention_form(recipe) -> str:
    """How attention learns where packed samples start: transformer-engine takes them as
    packed sequences (THD); the TE-free path as sample boundaries (trainer.model.attention)."""
    from trainer.model.build import have_transformer_engine

    return "thd" if have_transformer_engine() else "boundaries"


def packing_align(recipe) -> int:
    """transformer-engine's context-parallel attention splits every packed sample into 2 x CP
    equal chunks, so samples start at multiples of that."""
    cp = recipe.megatron.context_parallel_size
    return 2 * cp if cp > 1 and attention_form(recipe) == "thd" else 1


def setup(recipe) -> None:
    if devices.on_gpu():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    else:
        devices.install_cpu_shim()  # before megatron-core is imported (devices.py says why)
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    devices.patch_megatron()
    timeout = timedelta(seconds=recipe.trainer.collective_timeout_s)
    if not dist.is_initialized():
        dist.init_process_group(devices.backend(), timeout=timeout)
    host_group()  # created by every rank at the same point, before the parallel state's groups
    meg = recipe.megatron
    ps.initialize_model_parallel(
        distributed_timeout_minutes=timeout.total_seconds() / 60,
        tensor_model_parallel_size=meg.tensor_model_parallel_size,
        pipeline_model_parallel_size=meg.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=meg.virtual_pipeline_model_parallel_size,
        context_parallel_size=meg.context_parallel_size,
        expert_model_parallel_size=meg.expert_model_parallel_size,
        expert_tensor_parallel_size=meg.expert_tensor_parallel_size,
    )
    seed = recipe.trainer.seed
    torch.manual_seed(seed)  # the same on every rank: CPU initialisation then slices the same weights
    model_parallel_cuda_manual_seed(seed)


def build(recipe, run_dir: Path) -> Run:
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from trainer.model.build import build_model

    dtype = torch.bfloat16 if devices.on_gpu() else torch.float32
    meg = recipe.megatron
    vpp = meg.virtual_pipeline_model_parallel_size or 1
    chunks = []
    for vp_stage in range(vpp):
        stage = vp_stage if vpp > 1 else None
        chunks.append(build_model(
            recipe, dtype,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            vp_stage=stage))
    if recipe.model.lora.enabled:  # the base frozen: megatron-core builds no gradient buffer or state for it
        from trainer.model import lora

        for chunk in chunks:
            lora.attach(chunk, recipe.model.lora, recipe.trainer.seed)
    for chunk in chunks:
        chunk.to(devices.device())
        _mark_replicated_experts(chunk, meg)
    config = chunks[0].config
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=meg.grad_reduce_in_fp32, overlap_grad_reduce=meg.overlap_grad_reduce,
        overlap_param_gather=meg.overlap_param_gather, use_distributed_optimizer=meg.use_distributed_optimizer,
        bucket_size=meg.ddp_bucket_size, average_in_collective=False)
    model = [DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk,
                                     disable_bucketing=i > 0) for i, chunk in enumerate(chunks)]
    fused.add_grads_by_hook(model)
    config.finalize_model_grads_func = finalize_grads
    config.no_sync_func = [m.no_sync for m in model] if len(model) > 1 else model[0].no_sync
    optim = recipe.optim
    opt_config = OptimizerConfig(
        optimizer="adam", lr=optim.lr, min_lr=optim.min_lr, weight_decay=optim.weight_decay,
        adam_beta1=optim.betas[0], adam_beta2=optim.betas[1], clip_grad=optim.clip_grad,
        bf16=dtype == torch.bfloat16, params_dtype=dtype,
        use_distributed_optimizer=meg.use_distributed_optimizer,
        optimizer_cpu_offload=meg.optimizer_offload and devices.on_gpu(),
        optimizer_offload_fraction=1.0, use_torch_optimizer_for_cpu_offload=meg.optimizer_offload)
    optimizer = get_megatron_optimizer(opt_config, model)
    fused.fuse_adam(optimizer)
    total = recipe.trainer.total_training_steps
    warmup = int(recipe.optim.lr_warmup_steps_ratio * total)
    style = {"cosine": "cosine", "linear": "linear", "constant": "constant"}[recipe.optim.lr_scheduler]
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if warmup else optim.lr, max_lr=optim.lr, min_lr=optim.min_lr,
        lr_warmup_steps=warmup, lr_decay_steps=max(total, 1), lr_decay_style=style,
        start_wd=optim.weight_decay, end_wd=optim.weight_decay, wd_incr_steps=max(total, 1), wd_incr_style="constant")
    return Run(recipe=recipe, run_dir=run_dir, model=model, optimizer=optimizer, scheduler=scheduler,
               config=config, dtype=dtype)


def finalize_grads(model, num_tokens=None, pg_collection=None, **kwargs) -> None:
    """megatron-core's finalize_model_grads, dividing the gradients by the global batch's
    response-token count on the device. megatron-core tests `num_tokens > 0` on the host first:
    the host waits there for the whole backward, and the GPU then idles while the host launches
    what follows (the optimizer's first kernels), a few milliseconds a step (bench/README.md)."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads

    finalize_model_grads(model, None, pg_collection=pg_collection, **kwargs)
    if num_tokens is None:
        return
    pp = pg_collection.pp if pg_collection is not None else ps.get_pipeline_model_parallel_group()
    dp_cp = (pg_collection.dp_cp if pg_collection is not None
             else ps.get_data_parallel_group(with_context_parallel=True))
    dist.broadcast(num_tokens, src=dist.get_process_group_ranks(pp)[-1], group=pp)  # counted on the last stage
    dist.all_reduce(num_tokens, group=dp_cp)
    scaling = 1.0 / num_tokens.clamp(min=1)  # no tokens: the gradients are zero already
    for chunk in model:
        chunk.scale_gradients(scaling)


def _mark_replicated_experts(model, meg) -> None:
    """megatron-core flags expert weights as such (allreduce=False, reduced over the expert
    data-parallel group) only when EP > 1. With EP=1 and ETP < TP, the TP ranks hold the same
    experts but route different sequence shards to them, and the data-parallel group that would
    reduce "dense" weights leaves those ranks out: each rank would keep its own partial
    gradient. Flag them, so that DDP sums them over the expert data-parallel group."""
    if meg.expert_model_parallel_size > 1 or meg.expert_tensor_parallel_size == meg.tensor_model_parallel_size:
        return
    for name, param in model.named_parameters():
        # routed experts (shared experts are ordinary TP-sharded weights); LoRA adapters say
        # themselves how they are reduced (trainer.model.lora)
        if ".mlp.experts." in name and ".lora" not in name:
            param.allreduce = False


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Sum of per-token losses over response tokens, and their count.

    megatron-core (calculate_per_token_loss) adds the counts over micro-batches and
    data-parallel ranks and divides the gradients by the total: the loss is the mean over
    every response token of the global batch, whatever the length of each response.
    Tokens outside the mask are selected out, not multiplied by zero: padding that packed
    attention leaves unwritten must not turn the sum into NaN.
    """
    mask = loss_mask.reshape(-1).float()
    total = torch.sum(torch.where(mask > 0, output_tensor.reshape(-1).float(), 0.0))
    count = mask.sum().to(torch.int)
    return total, count, {"lm loss": torch.stack([total.detach(), mask.sum().detach()])}


def forward_step(data_iterator, model, return_schedule_plan: bool = False):
    """One micro-batch's forward pass, or (megatron.overlap_moe_expert_parallel_comm) the plan
    of it that megatron-core's combined schedule runs beside another micro-batch's backward."""
    from megatron.core.utils import get_model_config

    from trainer.model import thd

    batch = on_this_cp_rank(dict(next(data_iterator)))
    if "rows" in batch:  # rows laid end to end (transformer-engine's packed sequences)
        thd.mark_rows(get_model_config(model), *batch.pop("rows"))
    # The loss mask also reaches megatron-core's multi-token-prediction loss, when there is one.
    forward = model.build_schedule_plan if return_schedule_plan else model
    output = forward(batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"],
                     loss_mask=batch["loss_mask"], packed_seq_params=batch.get("packed_seq_params"))
    return output, partial(loss_func, batch["loss_mask"])


def on_this_cp_rank(batch: dict) -> dict:
    """With context parallelism each rank keeps its part of the sequence: two chunks of each
    row, with its pieces of each sample for attention (trainer.model.cp_attention), or under
    packed sequences two chunks of each sample (transformer-engine's partitioning)."""
    from megatron.core import parallel_state as ps
    from megatron.core.utils import get_batch_on_this_cp_rank

    params = batch.pop("packed_seq_params", None)
    cp = ps.get_context_parallel_world_size()
    if params is None:
        if cp == 1:
            return batch
        from trainer.model import cp_attention

        boundaries = batch.pop("attention_mask")
        rows, length = batch["tokens"].shape
        spans = cp_attention.rank_spans(boundaries.host, rows, length, cp, ps.get_context_parallel_rank())
        batch = get_batch_on_this_cp_rank(batch)
        batch["attention_mask"] = cp_attention.spans_on_device(spans, batch["tokens"].device)
        return batch
    if cp > 1:
        import transformer_engine_torch as tex

        spans = params.cu_seqlens_q_padded if params.cu_seqlens_q_padded is not None else params.cu_seqlens_q
        index = tex.thd_get_partitioned_indices(spans, batch["tokens"].shape[1], cp, ps.get_context_parallel_rank())
        for key in ("tokens", "labels", "loss_mask", "position_ids"):
            batch[key] = batch[key].index_select(1, index)
    batch["packed_seq_params"] = params
    return batch


def run_batches(run: Run, micro_batches: list[dict], forward_only: bool, tokens: int = 0) -> torch.Tensor:
    """Forward (and backward) over this rank's micro-batches; [loss sum, response-token count,
    sum of `tokens` over data-parallel ranks] of the global batch, the same on every rank, on
    the device (reading it waits for the GPU)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from trainer.data.batches import to_device

    length, rows = run.recipe.data.max_length, run.recipe.data.micro_batch_size
    if "packed_seq_params" in micro_batches[0]:  # rows laid end to end: one sequence (pipeline shapes)
        length, rows = length * rows, 1
    iterators = iter(micro_batches)
    if len(run.model) > 1:
        iterators = [iter(micro_batches) for _ in run.model]
    outputs = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iterators, model=run.model,
        num_microbatches=len(micro_batches), seq_length=length, micro_batch_size=rows, forward_only=forward_only)
    # Each CP rank holds a different part of the sequence: all of them count (TP ranks repeat it).
    counts_here = ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0
    # one rank of each data-parallel replica counts the tokens; through pinned memory, as a
    # Python number written into a GPU tensor makes the host wait for the GPU's queue
    totals = to_device(np.array([0.0, 0.0, tokens if counts_here and ps.get_context_parallel_rank() == 0 else 0.0]),
                       devices.device())
    if counts_here:
        for out in outputs:
            totals[:2] += out["lm loss"].to(totals)
    dist.all_reduce(totals)
    return totals


def zero_grads(run: Run) -> None:
    for chunk in run.model:
        chunk.zero_grad_buffer()
    run.optimizer.zero_grad()


def moe_aux_loss():
    """[sum, number of layer entries] of the load-balancing losses this step, on the device, or None."""
    from megatron.core.transformer.moe.moe_utils import (
        clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker, reduce_aux_losses_tracker_across_ranks)

    tracker = get_moe_layer_wise_logging_tracker()
    names = [n for n in tracker if "load_balancing" in n]
    if not names:
        return None
    reduce_aux_losses_tracker_across_ranks(names)
    values = [tracker[n]["values"] for n in names]
    sums = torch.stack([sum(v.sum() for v in values), sum((v != 0).sum() for v in values)]).double()
    clear_aux_losses_tracker()  # (after the sums on the same stream)
    return sums


def mtp_loss():
    """Mean multi-token-prediction loss over MTP layers this step, from megatron-core's tracker,
    on the device (summed over micro-batches), or None."""
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    tracker = MTPLossLoggingHelper.tracker
    if "values" not in tracker:
        return None
    values = tracker["values"]
    if tracker.get("reduce_group") is not None:
        dist.all_reduce(values, group=tracker["reduce_group"])
    if tracker.get("avg_group") is not None:
        dist.all_reduce(values, group=tracker["avg_group"], op=dist.ReduceOp.AVG)
    result = values.mean().double().reshape(1)
    values.zero_()
    return result


def split_for_rank(rows: list, micro_batch_size: int) -> list[list]:
    """This data-parallel rank's micro-batches out of a global batch of rows."""
    from megatron.core import parallel_state as ps

    return rank_share(rows, micro_batch_size, ps.get_data_parallel_world_size(), ps.get_data_parallel_rank())


def rank_share(rows: list, micro_batch_size: int, dp: int, rank: int) -> list[list]:
    per_step = micro_batch_size * dp
    return [rows[j + rank * micro_batch_size: j + (rank + 1) * micro_batch_size]
            for j in range(0, len(rows), per_step)]


def agree_between_steps(run_dir: Path, signalled: bool, gc_seconds: float) -> tuple[bool, float]:
    """Whether any rank was asked to stop, and the most seconds any rank spent in Python's
    garbage collector since the last agreement (a rank paused there holds all the others at
    the next collective, so the slowest one is the step's). Agreed among the hosts (gloo):
    over NCCL the numbers would queue behind the step's kernels, and reading them would make
    the host wait for them."""
    flags = torch.tensor([1.0 if (signalled or (run_dir / STOP_FILE).exists()) else 0.0, gc_seconds],
                         dtype=torch.float64)
    if dist.get_world_size() > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=host_group())
    return bool(flags[0]), float(flags[1])


@cache
def host_group():
    """All ranks, over gloo: agreements among the hosts that the GPUs' queues must not hold up."""
    return dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD


def validate(run: Run, val_rows: list) -> float | None:
    if not val_rows:
        return None
    recipe = run.recipe
    gbs, mbs = recipe.data.global_batch_size, recipe.data.micro_batch_size
    loss_sum = count = 0.0
    for chunk in run.model:
        chunk.eval()
    with torch.no_grad():
        for start in range(0, len(val_rows), gbs):
            rows = val_rows[start:start + gbs]
            rows = rows + [empty_row(val_rows[0])] * (gbs - len(rows))  # every rank: the same micro-batch count
            batches = [run.batch(group) for group in split_for_rank(rows, mbs)]
            s, c, _ = run_batches(run, batches, forward_only=True).tolist()
            loss_sum, count = loss_sum + s, count + c
    for chunk in run.model:
        chunk.train()
    return loss_sum / max(count, 1)


def empty_row(like):
    from trainer.data.batches import Row

    return Row(like.tokens.copy(), like.labels.copy(), like.loss_mask * 0, like.sample.copy())


@contextmanager
def parameters_gathered(run: Run):
    """The model's weights as the last optimizer step left them, for a checkpoint or a validation
    pass. With megatron.overlap_param_gather the updated shards reach the other data-parallel
    ranks bucket by bucket during the next forward (DDP's forward pre-hooks): a checkpoint
    written in between would hold the previous step's weights. Gather them all now, and keep
    the pre-hooks off meanwhile, as megatron-core's own training loop does."""
    if not run.recipe.megatron.overlap_param_gather:
        yield
        return
    for chunk in run.model:
        chunk.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        for chunk in run.model:
            chunk.enable_forward_pre_hook()


def offload_grads(run: Run, offload: bool) -> None:
    """megatron.grad_offload: the gradient buffers hold nothing during validation and checkpoint
    writes, so their memory is released then and re-allocated (zeroed) for the next step."""
    if not run.recipe.megatron.grad_offload:
        return
    for chunk in run.model:
        for buffer in chunk.buffers + chunk.expert_parallel_buffers:
            if offload:
                buffer.offload_to_cpu(move_params=False, move_grads=True)
            else:
                buffer.reload_from_cpu(move_params=False, move_grads=True)


@contextmanager
def collectives_named(current_step, timeout_s: int):
    """A collective that times out (gloo raises; NCCL's watchdog reports it itself) becomes
    one line naming the step and this rank."""
    try:
        yield
    except RuntimeError as err:
        if "timed out" not in str(err).lower() and "timeout" not in str(err).lower():
            raise
        raise CollectiveTimeout(
            f"step {current_step()}: rank {dist.get_rank()} waited {timeout_s} s in a collective: another rank "
            "hung or died (its log says which; trainer.collective_timeout_s sets the wait)") from None


def steps_of(train_data, positions: dict, rows_per_step: int, micro_batch_size: int, dp: int, rank: int):
    """Per optimizer step: (this rank's slots' positions after it, the real tokens of this rank's
    rows, this rank's micro-batches of rows, this rank's data counts so far). Runs in the data
    worker (prefetch): each rank reads and tokenises only the row slots of the global batch it
    trains on (SFTData.slot_stream), and every rank's rows are those of any other layout."""
    groups = rank_share(list(range(rows_per_step)), micro_batch_size, dp, rank)
    mine = [slot for group in groups for slot in group]
    stream = train_data.slot_stream(mine, rows_per_step, positions)
    positions = dict(positions)
    while True:
        rows = {}
        for _ in mine:
            slot, position, row = next(stream)
            rows[slot], positions[slot] = row, position
        tokens = sum(row.real_tokens() for row in rows.values())
        yield ({s: positions[s] for s in mine}, tokens, [[rows[s] for s in group] for group in groups],
               dict(train_data.counts))


def data_counts(per_rank) -> dict:
    """Bad rows skipped and samples truncated, summed over data-parallel ranks (each reads its own)."""
    return dict(sum((Counter(counts) for counts in per_rank), Counter()))


def gathered(value, group):
    """Every data-parallel rank's `value` (a small picklable object), in rank order."""
    values = [None] * dist.get_world_size(group)
    dist.all_gather_object(values, value, group=group)
    return values


def train(recipe, run_dir: Path, model_dims, tokenizer, train_data, val_rows) -> int:
    """Returns the process exit code: 0 when done or stopped cleanly with a checkpoint."""
    import signal

    from megatron.core import parallel_state as ps

    from launcher.alerts import step_alerts
    from launcher.errors import UserError
    from launcher.resume import refusal
    from trainer.data.batches import earliest_epoch, prefetch

    run = build(recipe, run_dir)
    ckpt_root = Path(recipe.trainer.default_local_dir)
    rank0 = dist.get_rank() == 0
    gbs, mbs = recipe.data.global_batch_size, recipe.data.micro_batch_size
    step, positions = 0, {slot: (0, 0) for slot in range(gbs)}  # each row slot's next sample: (epoch, place)
    resume = checkpoint.resume_point(ckpt_root, recipe.trainer.resume_from_path)
    if resume is not None:
        refused = refusal(ckpt_root, recipe.to_dict())
        if refused:
            raise UserError(refused)
        if recipe.model.lora.enabled:  # a LoRA checkpoint holds the adapters: the base comes from its own
            checkpoint.load_weights(Path(recipe.megatron.dist_checkpointing_path), run.model)
        state = checkpoint.load(resume, run.model, run.optimizer, run.scheduler)
        step = state["step"]
        if "next_samples" in state:
            positions = {slot: tuple(at) for slot, at in enumerate(state["next_samples"])}
        else:  # written before slots packed across epochs: the epoch from its start
            positions = {slot: (state["epoch"], 0) for slot in range(gbs)}
        if rank0:
            print(f"resumed from {resume} at step {step} (epoch {earliest_epoch(positions)})", flush=True)
    elif recipe.megatron.dist_checkpointing_path:
        checkpoint.load_weights(Path(recipe.megatron.dist_checkpointing_path), run.model)
        if rank0:
            print(f"initial weights from {recipe.megatron.dist_checkpointing_path}", flush=True)

    if recipe.model.lora.enabled and rank0:
        from trainer.model.lora import counts

        held = counts(run.model, run.optimizer)
        print(f"lora: rank 0 holds trainable {held['trainable']:,} and frozen {held['frozen']:,} parameters; "
              f"gradient buffers {held['grad_buffers']:,}; optimizer state for {held['optimized']:,}", flush=True)
    total = recipe.trainer.total_training_steps
    if step >= total:  # submitted again after it finished: train nothing, write nothing
        if rank0:
            print(f"run already complete: its checkpoint is at step {step} of {total}; nothing to train "
                  "(raise trainer.total_training_steps to train on; `launcher submit --restart` or another "
                  "job.name starts over)",
                  flush=True)
        return 0
    log = MetricsLog(run_dir, rank0, total, recipe.trainer.tensorboard)
    # layer_<i> for i >= num_layers are the multi-token-prediction layers
    counter = RoutingCounter(run.model, model_dims.num_layers + (run.config.mtp_num_layers or 0),
                             model_dims.num_experts)
    duplicates = ps.get_tensor_model_parallel_world_size() if not recipe.megatron.sequence_parallel else 1
    peak = peak_tflops()
    per_token = flops_per_token(model_dims)
    data_ranks = ps.get_data_parallel_group()
    my_slots = [slot for group in split_for_rank(list(range(gbs)), mbs) for slot in group]
    stream = prefetch(steps_of(train_data, positions, gbs, mbs, ps.get_data_parallel_world_size(),
                               ps.get_data_parallel_rank()))
    profile = StepProfile(rank0, first=max(total - 2, step))  # the last two steps
    signalled = []
    signal.signal(signal.SIGTERM, lambda *_: signalled.append(True))
    recent_losses: list[float] = []  # for the loss-spike alert

    def save() -> None:
        with parameters_gathered(run):
            save_gathered()

    def save_gathered() -> None:
        offload_grads(run, True)
        everyone = gathered(({s: positions[s] for s in my_slots}, dict(train_data.counts)), data_ranks)
        slots = {slot: at for held, _ in everyone for slot, at in held.items()}
        state = {"step": step, "epoch": earliest_epoch(slots), "next_samples": [slots[s] for s in range(gbs)],
                 "counts": data_counts(counts for _, counts in everyone),
                 "recipe": recipe.to_dict()}  # what this run is (launcher.resume)
        if recipe.model.lora.enabled:  # the adapters' base, for `launcher convert`
            state["lora_base"] = recipe.megatron.dist_checkpointing_path
        path = checkpoint.save(ckpt_root, step, run.model, run.optimizer, run.scheduler, state,
                               keep=recipe.trainer.max_ckpt_to_keep)
        offload_grads(run, False)
        if rank0:
            print(f"checkpoint {path}", flush=True)

    def validation_pass() -> None:
        offload_grads(run, True)
        with parameters_gathered(run):
            val_loss = validate(run, val_rows)
        offload_grads(run, False)
        if val_loss is not None:
            log.log({"step": step, "val_loss": val_loss})

    def fetch():
        """The next step's (position, micro-batches on the device, seconds the host waited for them)."""
        began = time.time()
        position = next(stream)
        return position, [run.batch(group) for group in position[2]], time.time() - began

    def write(done, next_start: float | None = None) -> None:
        """Log a trained step, once its numbers are on the host; its time runs to the next step's start."""
        n = done.read()
        elapsed = (next_start or time.time()) - n["start"]
        (loss_sum, count, tokens), aux, mtp = n["totals"], n["aux"], n["mtp"]
        tflops = per_token * tokens / elapsed / dist.get_world_size() / 1e12
        record = {"step": n["step"], "epoch": n["epoch"], "loss": loss_sum / max(count, 1), "lr": n["lr"],
                  "grad_norm": float(n["grad_norm"]) if n["grad_norm"] is not None else math.nan,
                  "tokens_per_s": tokens / elapsed, "response_tokens": int(count), "step_time_s": elapsed,
                  "data_time_s": n["data_time"], "tflops_per_gpu": tflops, "mfu": tflops / peak if peak else None,
                  "moe_aux_loss": aux[0] / max(aux[1], 1) / n["micro_batches"] if aux else None,
                  "mtp_loss": mtp[0] / n["micro_batches"] if mtp else None,
                  "tokens_per_expert": per_layer(n["routed"], duplicates), "skipped_update": not n["ok"],
                  "gc_pause_s": n["gc_pause"]}  # the slowest rank's, during this step's host work
        if recipe.model.override_config.moe_config.capacity_factor is not None:
            record["moe_dropped_fraction"] = dropped_fraction(n["routed"])
        if recipe.megatron.expert_model_parallel_size > 1:
            record["expert_parallel_load"] = expert_parallel_load(record["tokens_per_expert"],
                                                                  recipe.megatron.expert_model_parallel_size)
        if devices.on_gpu():
            record["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            # times the caching allocator found no free block, released its cache and asked CUDA
            # again (a stall of the whole device); climbing by step means fragmentation
            record["alloc_retries"] = torch.cuda.memory_stats().get("num_alloc_retries", 0)
        record["alerts"] = step_alerts(record, recent_losses, recipe.trainer.alert_loss_spike,
                                       recipe.trainer.alert_expert_imbalance)
        recent_losses.append(record["loss"])
        for alert in record["alerts"] if rank0 else []:
            print(f"alert: {alert}", flush=True)
        log.log(record, console=n["step"] % recipe.trainer.log_every == 0 or n["step"] == total)

    # The host never waits on the GPU within a step (no value is read back: the gradient norm and
    # clipping stay on the device, trainer.optimizer_step; the stop flag is agreed over gloo), so
    # it runs ahead of the GPU's queue: the next rows are fetched during this step's backward, and
    # a step is logged during the next one's (InFlight). A stop request seen during a step ends
    # the run after that step.
    if fused.enabled("gc_freeze"):
        gc_pauses.freeze_setup()
    pauses = gc_pauses.GcPauses()
    upcoming, pending = fetch(), None
    with collectives_named(lambda: step + 1, recipe.trainer.collective_timeout_s):
        try:
            while step < total:
                profile.before_step(step)
                start = time.time()
                (held, tokens, _, counts), batches, data_time = upcoming
                zero_grads(run)
                totals = run_batches(run, batches, forward_only=False, tokens=tokens)
                # the next rows, collated now, while the GPU works through a deep queue of this
                # step's backward; after the optimizer's launches, the queue ran dry meanwhile
                upcoming = fetch() if step + 1 < total else None
                if pending is not None:  # the last step's numbers, on the host by now; the GPU is busy
                    write(pending, start)
                    pending = None
                stop, gc_pause = agree_between_steps(run_dir, bool(signalled), pauses.take())
                ok, grad_norm = optimizer_step.step(run.optimizer)
                run.scheduler.step(increment=1)
                pending = InFlight({"totals": totals, "aux": moe_aux_loss(),
                                    "mtp": mtp_loss() if recipe.model.enable_mtp else None, "routed": counter.take(),
                                    "grad_norm": grad_norm},
                                   gc_pause=gc_pause,
                                   step=step + 1, epoch=earliest_epoch(held), start=start,
                                   data_time=data_time, ok=ok, lr=run.optimizer.param_groups[0]["lr"],
                                   micro_batches=len(batches))
                # the step is done once its last collective is (a timeout names the step in progress)
                step, positions = step + 1, {**positions, **held}
                train_data.counts.clear()  # the worker's: bad rows skipped, samples truncated
                train_data.counts.update(counts)
                validating = recipe.trainer.test_freq > 0 and step % recipe.trainer.test_freq == 0 and step < total
                saving = recipe.trainer.save_freq > 0 and step % recipe.trainer.save_freq == 0 and step < total
                if stop or validating or saving or step == total:
                    write(pending)
                    pending = None
                profile.after_step(step)
                if stop:
                    save()
                    if rank0:
                        print(f"stopped at step {step} on request; the next run resumes here", flush=True)
                    log.close()
                    return 0
                if validating:
                    validation_pass()
                if saving:
                    save()
        finally:
            if pending is not None:  # an error mid-step: the step before it was trained, so log it
                write(pending)
            pauses.close()

    validation_pass()
    save()
    bad = data_counts(gathered(dict(train_data.counts), data_ranks))
    if rank0:
        if bad:
            print(f"data: {bad}", flush=True)
        print(f"done: {step} steps; metrics {run_dir / 'metrics.jsonl'}; checkpoint {ckpt_root / 'latest'}", flush=True)
    log.close()
    return 0
