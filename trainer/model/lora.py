"""LoRA adapters on megatron-core's linear layers, the base model frozen.

An adapter on a linear layer W adds (alpha / rank) * B(A(dropout(x))) to W's output, B starting
at zero so that step 0 is the base model. It is split like W (launcher.plan.lora says how the
planner counts it):

- column-parallel W (output split over TP): A whole on every TP rank, B split by rows. The
  rank-sized middle A x is the same on every rank; its gradient is summed over TP on the way
  back (with sequence parallelism: the middle is gathered along the sequence instead).
- row-parallel W (input split): A split by columns, B whole; the partial middles are summed
  over TP (reduce-scattered along the sequence under sequence parallelism) before B.
- whole W (MLA's down-projections, the router): nothing to split.
  Under sequence parallelism each TP rank sees its own tokens, so a whole A or B gets only a
  part of its gradient there: such weights are flagged like megatron-core's own norms
  (`sequence_parallel`), whose gradients it sums over TP.
- routed experts: one A/B pair per expert, stacked along the expert axis and split by EP like
  the experts' weights, run per expert by SequentialMLP (CPU) and as grouped products by
  GroupedMLP (GPU); or one pair every expert shares (`expert_adapters: shared`), an ordinary
  replicated weight that sees every routed token. Under expert_tensor_parallel_size > 1 (equal
  to TP) they split over ETP like the experts' fc1 (column) and fc2 (row): _attach_experts.

The adapters hang off the layers they adapt (`<linear>.lora`, `<experts>.lora_fc1/lora_fc2`)
and add their output through forward hooks (GroupedMLP: its forward, run with them). Their
first values depend only on the seed and on which weight (and expert) they adapt, never on the
layout, so the same run under another layout starts, and goes on, the same. Checkpoints hold
the adapters only (`adapter_state`), under layout-free keys; the base comes from its own.
"""

from __future__ import annotations

import fnmatch
import math
import types
import zlib

import torch

ADAPTER_KEY = ".lora"  # in every adapter parameter's name, and in no base weight's


class Adapter(torch.nn.Module):
    """A and B for one linear layer (or a stack of them, one per expert: `experts` > 0)."""

    def __init__(self, key: str, rank: int, n_in: int, n_out: int, scale: float, dropout: float,
                 seed: int, experts: tuple[int, int, int] | None = None):
        super().__init__()
        self.key, self.scale, self.dropout = key, scale, dropout
        self.split = "whole"  # set by attach: "column", "row" or "whole"
        self.glu = False  # on a SwiGLU fc1, whose output is [gate; up] on each TP rank
        self.summed_over = None  # routed experts under ETP > 1: ("A" or "B", the ETP group)
        if experts is None:
            a = _first_a(seed, key, rank, n_in)
            self.A = torch.nn.Parameter(a)
            self.B = torch.nn.Parameter(torch.zeros(n_out, rank))
        else:
            first, count, _ = experts  # this rank's experts: global index of the first, how many
            a = torch.stack([_first_a(seed, f"{key}.{first + e}", rank, n_in) for e in range(count)])
            self.A = torch.nn.Parameter(a)  # [experts, rank, in]
            self.B = torch.nn.Parameter(torch.zeros(count, n_out, rank))  # [experts, out, rank]
        self.experts = experts

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A and B as the forward uses them: under ETP > 1 the part every ETP rank holds whole
        gets only this rank's share of its gradient, so its gradient is summed over ETP."""
        a, b = self.A, self.B
        if self.summed_over is not None:
            part, group = self.summed_over
            if part == "A":
                a = _SumGradient.apply(a, group)
            else:
                b = _SumGradient.apply(b, group)
        return a, b

    def middle(self, x: torch.Tensor) -> torch.Tensor:
        if self.dropout and self.training:
            x = torch.nn.functional.dropout(x, self.dropout)
        return x @ self.A.t().to(x.dtype)


class _SumGradient(torch.autograd.Function):
    """Identity forward; the gradient summed over `group` on the way back."""

    @staticmethod
    def forward(ctx, weight, group):
        ctx.group = group
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


def _first_a(seed: int, key: str, rank: int, n_in: int) -> torch.Tensor:
    """A's first value: Kaiming-uniform as PEFT initialises it, drawn from a generator seeded by
    the seed and the weight's layout-free key, so every layout starts from the same adapters."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
    bound = 1 / math.sqrt(n_in)  # kaiming_uniform_ with a=sqrt(5)
    return (torch.rand(rank, n_in, generator=generator) * 2 - 1) * bound


def _linear_name(path: str) -> str:
    return path.rsplit(".", 1)[-1]


def attach(model, lora, seed: int) -> int:
    """Freeze `model` (one pipeline chunk of a GPTModel) and give the recipe's target layers of its
    decoder adapters. Returns how many layers got one."""
    from megatron.core import parallel_state as ps

    for param in model.parameters():
        param.requires_grad_(False)
    targets = lora.targets()
    excluded = [m for m in lora.exclude_modules if "*" in m]
    scale = lora.alpha / lora.rank
    sequence_parallel = model.config.sequence_parallel
    count = 0
    for layer in model.decoder.layers:
        prefix = f"decoder.layers.{layer.layer_number - 1}."
        for path, module in list(layer.named_modules()):
            name = _linear_name(path)
            key = prefix + path
            if name not in targets or any(fnmatch.fnmatch(key, pattern) for pattern in excluded):
                continue
            if path.endswith("mlp.experts") or ".mlp.experts." in f".{path}.":
                continue  # routed experts: below, as a stack
            if name == "router":
                _attach_router(module, key, lora, scale, seed, sequence_parallel)
            else:
                _attach_linear(module, key, lora, scale, seed, sequence_parallel)
            count += 1
        experts = getattr(layer.mlp, "experts", None)
        if experts is not None:
            for fc in ("linear_fc1", "linear_fc2"):
                key = f"{prefix}mlp.experts.{fc}"
                if fc in targets and not any(fnmatch.fnmatch(key, p) for p in excluded):
                    _attach_experts(experts, fc, key, lora, scale, seed, ps)
                    count += 1
    return count


def _weight_shape(module) -> tuple[int, int, str]:
    """(in, out) of the whole weight, and how this rank's part of it is split."""
    from megatron.core import parallel_state as ps

    weight = module.weight
    out_here, in_here = weight.shape
    tp = ps.get_tensor_model_parallel_world_size()
    if getattr(weight, "tensor_model_parallel", False) and tp > 1:
        if weight.partition_dim == 0:
            return in_here, out_here * tp, "column"
        return in_here * tp, out_here, "row"
    return in_here, out_here, "whole"


def _attach_linear(module, key: str, lora, scale: float, seed: int, sequence_parallel: bool) -> None:
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    n_in, n_out, split = _weight_shape(module)
    adapter = Adapter(key, lora.rank, n_in, n_out, scale, lora.dropout, seed)
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    with torch.no_grad():  # keep this rank's part of the whole first values
        if split == "column":
            adapter.B = torch.nn.Parameter(adapter.B.chunk(tp, 0)[tp_rank].clone())
        elif split == "row":
            adapter.A = torch.nn.Parameter(adapter.A.chunk(tp, 1)[tp_rank].clone())
    if split != "whole":  # a split part counts towards the gradient norm on every TP rank, as W's does
        set_tensor_model_parallel_attributes(adapter.B if split == "column" else adapter.A, True,
                                             0 if split == "column" else 1, 1)
    adapter.split = split
    adapter.glu = key.endswith("linear_fc1") and module.config.gated_linear_unit
    if sequence_parallel:  # each TP rank sees its own tokens: sum these gradients over TP
        for param in ([adapter.A] if split == "column" else [adapter.B] if split == "row" else [adapter.A, adapter.B]):
            param.sequence_parallel = True
    adapter.to(device=module.weight.device, dtype=module.weight.dtype)
    module.lora = adapter
    norm = getattr(module, "layer_norm_weight", None)  # transformer-engine's norm fused into the layer
    module.register_forward_hook(_linear_hook(adapter, module if norm is not None else None, sequence_parallel))


def _linear_hook(adapter: Adapter, fused_norm, sequence_parallel: bool):
    from megatron.core.tensor_parallel import mappings

    def hook(module, args, output):
        x = args[0]
        if fused_norm is not None:
            x = _rms_norm(x, fused_norm)
        middle = adapter.middle(x)
        if adapter.split == "column":
            middle = (mappings.gather_from_sequence_parallel_region(middle) if sequence_parallel
                      else mappings.copy_to_tensor_model_parallel_region(middle))
        elif adapter.split == "row":
            middle = (mappings.reduce_scatter_to_sequence_parallel_region(middle) if sequence_parallel
                      else mappings.reduce_from_tensor_model_parallel_region(middle))
        out, bias = output
        # out + scale * middle B^T as one product into out's copy (no full-size delta or scaling pass)
        merged = torch.addmm(out.reshape(-1, out.shape[-1]), middle.reshape(-1, middle.shape[-1]).to(out.dtype),
                             adapter.B.t().to(out.dtype), alpha=adapter.scale)
        return merged.view_as(out), bias

    return hook


def _rms_norm(x: torch.Tensor, module) -> torch.Tensor:
    """The input of a transformer-engine layer whose RMSNorm is fused in: the adapter adapts the
    same normalised input as the weight."""
    if getattr(module, "normalization", "RMSNorm") != "RMSNorm":
        raise ValueError(f"LoRA on a layer with a fused {module.normalization}: only RMSNorm is handled")
    weight = module.layer_norm_weight
    if getattr(module, "zero_centered_gamma", False):
        weight = weight + 1
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return (x.float() * torch.rsqrt(variance + module.eps)).to(x.dtype) * weight


def _attach_router(router, key: str, lora, scale: float, seed: int, sequence_parallel: bool) -> None:
    n_experts, hidden = router.weight.shape
    adapter = Adapter(key, lora.rank, hidden, n_experts, scale, lora.dropout, seed)
    if sequence_parallel:
        adapter.A.sequence_parallel = adapter.B.sequence_parallel = True
    adapter.to(device=router.weight.device, dtype=router.weight.dtype)
    router.lora = adapter
    gating = router.gating

    def adapted_gating(self, x):
        logits = gating(x)
        delta = (adapter.middle(x.to(adapter.A.dtype)) @ adapter.B.t()) * adapter.scale
        return logits + delta.to(logits.dtype)

    router.gating = types.MethodType(adapted_gating, router)


def _attach_experts(experts, fc: str, key: str, lora, scale: float, seed: int, ps) -> None:
    """A stack of adapters for the routed experts' `fc` (or one shared pair). Under ETP > 1
    (equal to TP) an expert's fc1 is split by output rows and its fc2 by input columns over the
    ETP ranks, which all see the same tokens: B of fc1 and A of fc2 are split the same way, and
    the parts every ETP rank holds whole (A of fc1, B of fc2) get their gradients summed over
    ETP; fc2's partial outputs are summed by megatron-core's ETP reduction, as the weight's are."""
    hidden = experts.config.hidden_size
    ffn = experts.config.moe_ffn_hidden_size
    glu = 2 if experts.config.gated_linear_unit else 1
    n_in, n_out = (hidden, glu * ffn) if fc == "linear_fc1" else (ffn, hidden)
    local = experts.num_local_experts
    if lora.expert_adapters == "shared":
        adapter = Adapter(key, lora.rank, n_in, n_out, scale, lora.dropout, seed, experts=(0, 1, 1))
    else:
        ep_rank = ps.get_expert_model_parallel_rank()
        total = local * ps.get_expert_model_parallel_world_size()
        adapter = Adapter(key, lora.rank, n_in, n_out, scale, lora.dropout, seed,
                          experts=(ep_rank * local, local, total))
    adapter.glu = fc == "linear_fc1" and glu == 2
    etp, etp_rank = ps.get_expert_tensor_parallel_world_size(), ps.get_expert_tensor_parallel_rank()
    if etp > 1:
        adapter.split = "column" if fc == "linear_fc1" else "row"
        with torch.no_grad():  # this rank's part of the whole first values
            if fc == "linear_fc1":  # rows of B: this rank's gate rows, then its up rows
                halves = adapter.B.chunk(glu, dim=1)
                adapter.B = torch.nn.Parameter(torch.cat([h.chunk(etp, dim=1)[etp_rank] for h in halves], dim=1))
            else:
                adapter.A = torch.nn.Parameter(adapter.A.chunk(etp, dim=2)[etp_rank].clone())
        adapter.summed_over = ("A" if fc == "linear_fc1" else "B", ps.get_expert_tensor_parallel_group())
    split_part = {"column": adapter.B, "row": adapter.A}.get(adapter.split)
    for param in adapter.parameters():
        if lora.expert_adapters != "shared":
            # expert weights: megatron-core reduces them over expert-DP and counts them in the
            # gradient norm on every rank that holds them, as it does the experts' own
            param.allreduce = False
        # a part split over ETP counts towards the gradient norm on every rank; under ETP > 1 a
        # part held whole counts once (TP rank 0; ETP equals TP)
        split = param is split_part or (etp == 1 and lora.expert_adapters != "shared")
        param.tensor_model_parallel, param.partition_dim, param.partition_stride = split, 0, 1
    if experts.config.sequence_parallel and lora.expert_adapters == "shared" and etp == 1:
        adapter.A.sequence_parallel = adapter.B.sequence_parallel = True
    weight = next(experts.parameters())
    adapter.to(device=weight.device, dtype=weight.dtype)
    setattr(experts, f"lora_{fc[-3:]}", adapter)
    if hasattr(experts, "local_experts"):  # SequentialMLP: a module per expert
        for index, expert in enumerate(experts.local_experts):
            getattr(expert, fc).register_forward_hook(_expert_hook(adapter, index))
    else:
        _run_grouped_with_adapters(experts)


def _expert_hook(adapter: Adapter, index: int):
    def hook(module, args, output):
        i = index if adapter.A.shape[0] > 1 else 0
        x = args[0]
        if adapter.dropout and adapter.training:
            x = torch.nn.functional.dropout(x, adapter.dropout)
        out, bias = output
        a, b = adapter.weights()
        middle = x @ a[i].t().to(x.dtype)
        return torch.addmm(out, middle.to(out.dtype), b[i].t().to(out.dtype), alpha=adapter.scale), bias

    return hook


def _grouped_delta(adapter: Adapter | None, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor | None:
    from trainer.model.experts import gmm

    if adapter is None:
        return None
    if adapter.dropout and adapter.training:
        x = torch.nn.functional.dropout(x, adapter.dropout)
    a, b = (w.to(x.dtype) for w in adapter.weights())
    if a.shape[0] == 1:  # one pair for every expert
        return (x @ a[0].t() * adapter.scale) @ b[0].t()
    # scale the rank-sized middle, not the full-size output
    middle = gmm(x, a.transpose(1, 2).contiguous(), tokens_per_expert) * adapter.scale
    return gmm(middle, b.transpose(1, 2).contiguous(), tokens_per_expert)


def _run_grouped_with_adapters(experts) -> None:
    """GroupedMLP's forward, with the adapters' grouped products added to fc1 and fc2."""
    from trainer.model.experts import gmm

    if getattr(experts, "runs_adapters", False):
        return
    experts.runs_adapters = True

    def forward(self, x, tokens_per_expert, probs):
        if self.config.moe_apply_probs_on_input or self.activation_recompute:
            raise ValueError("LoRA on grouped experts runs without moe_apply_probs_on_input and expert recompute")
        fc1_lora, fc2_lora = getattr(self, "lora_fc1", None), getattr(self, "lora_fc2", None)
        w1 = self.weight1.view(self.num_local_experts, self.config.hidden_size, -1)
        w2 = self.weight2.view(self.num_local_experts, -1, self.config.hidden_size)
        fc1 = gmm(x, w1, tokens_per_expert)
        delta = _grouped_delta(fc1_lora, x, tokens_per_expert)
        if delta is not None:
            fc1 = fc1.add_(delta)  # in place: the product's backward does not read its output
        middle = self.activation_func_with_probs(fc1, probs.unsqueeze(-1))
        fc2 = gmm(middle, w2, tokens_per_expert)
        delta = _grouped_delta(fc2_lora, middle, tokens_per_expert)
        if delta is not None:
            fc2 = fc2.add_(delta)
        return fc2, None

    experts.forward = types.MethodType(forward, experts)


def adapters(model_chunks) -> list[Adapter]:
    found = []
    for chunk in model_chunks:
        module = getattr(chunk, "module", chunk)
        found += [m for m in module.modules() if isinstance(m, Adapter)]
    return found


def adapter_state(model_chunks) -> dict:
    """The adapters' sharded state under layout-free keys: `<layer path>.lora.A|B` (global layer
    numbers), routed experts' stacks along their global expert axis."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    dp_rank = ps.get_data_parallel_rank(with_context_parallel=True)
    state = {}
    for adapter in adapters(model_chunks):
        for part in ("A", "B"):
            param = getattr(adapter, part)
            key = f"{adapter.key}{ADAPTER_KEY}.{part}"
            if part == "B" and adapter.glu and adapter.experts is None:
                # [gate; up] on each TP rank: saved as the gate and up halves (B_w, B_v), each
                # split over TP, as megatron-core saves the weight, so the layout does not show
                state[key] = apply_swiglu_sharded_factory(
                    ShardedTensor.from_rank_offsets(key, param, (0, tp_rank, tp), replica_id=(0, 0, dp_rank)),
                    (), singleton_local_shards=True)
            elif adapter.experts is not None:
                state.update(_expert_shards(key, adapter, part, param, dp_rank))
            elif (adapter.split, part) in (("column", "B"), ("row", "A")):
                axis = 0 if adapter.split == "column" else 1
                state[key] = ShardedTensor.from_rank_offsets(key, param, (axis, tp_rank, tp),
                                                             replica_id=(0, 0, dp_rank))
            else:
                state[key] = ShardedTensor.from_rank_offsets(key, param, replica_id=(0, tp_rank, dp_rank))
    return state


def _expert_shards(key: str, adapter: Adapter, part: str, param, dp_rank: int) -> dict:
    """A routed experts' stack (or shared pair): sharded along the global expert axis by EP, and
    along its split axis by ETP where it is split. A SwiGLU fc1's B goes out as its gate and up
    halves (B_w, B_v: [experts, ffn, rank] each), so its keys and shapes do not depend on ETP."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    first, count, total = adapter.experts
    per_expert = total > 1
    etp, etp_rank = ps.get_expert_tensor_parallel_world_size(), ps.get_expert_tensor_parallel_rank()
    data_rank = ps.get_expert_data_parallel_rank() if per_expert else dp_rank
    axes = [(0, first // count, total // count)] if per_expert else []
    split_axis = {("column", "B"): 1, ("row", "A"): 2}.get((adapter.split, part))
    if split_axis is not None:
        axes.append((split_axis, etp_rank, etp))
        replica = (0, 0, data_rank)
    else:  # whole on every ETP rank (and on every TP rank, a shared pair)
        replica = (0, etp_rank if per_expert else ps.get_tensor_model_parallel_rank(), data_rank)
    if part == "B" and adapter.glu:  # through a factory, so that the optimizer's states split alike

        def halves(name, tensor, replica_id, flattened_range):
            assert flattened_range is None, "a flattened optimizer state of a SwiGLU expert adapter"
            return [ShardedTensor.from_rank_offsets(f"{name}_{h}", half.contiguous(), *axes, replica_id=replica_id)
                    for h, half in zip("wv", tensor.chunk(2, dim=1))]

        return {key: ShardedTensorFactory(key, param, halves, lambda parts: torch.cat(parts, dim=1), replica)}
    return {key: ShardedTensor.from_rank_offsets(key, param, *axes, replica_id=replica)}


def load_adapters(loaded: dict, model_chunks) -> None:
    for adapter in adapters(model_chunks):
        for part in ("A", "B"):
            getattr(adapter, part).data.copy_(loaded[f"{adapter.key}{ADAPTER_KEY}.{part}"])


def counts(model_chunks, optimizer) -> dict:
    """What this rank holds, in elements: trainable and frozen weights, megatron-core DDP's
    gradient buffers, and the weights whose optimizer state it keeps (the distributed
    optimizer's shard: a part of the trainable weights on each data-parallel rank)."""
    found = {"trainable": 0, "frozen": 0, "grad_buffers": 0, "optimized": 0}
    for chunk in model_chunks:
        for param in getattr(chunk, "module", chunk).parameters():
            found["trainable" if param.requires_grad else "frozen"] += param.numel()
        for buffer in [*getattr(chunk, "buffers", []), *getattr(chunk, "expert_parallel_buffers", [])]:
            found["grad_buffers"] += sum(p.numel() for p in buffer.params)
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        shards = [*getattr(part, "shard_fp32_groups", []), *getattr(part, "shard_fp32_from_float16_groups", [])]
        params = [p for group in shards for p in group] or [p for g in part.param_groups for p in g["params"]]
        found["optimized"] += sum(p.numel() for p in params)
    return found
