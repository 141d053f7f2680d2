"""The trainer's replacements for megatron-core pieces give megatron-core's results (CPU).

The GPU-only kernels (flash attention over samples, compiled RMSNorm and RoPE, weight
gradients into the main gradient) are checked against the plain code by bench/gpu_speed.py,
which asserts before it times anything.
"""

import pytest
import torch

pytest.importorskip("megatron.core")

from megatron.core.transformer.moe import moe_utils  # noqa: E402

from trainer.model import dispatch  # noqa: E402


def routing(tokens: int, experts: int, topk: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(tokens, experts, generator=generator)
    chosen = scores.topk(topk, dim=1).indices
    routing_map = torch.zeros(tokens, experts, dtype=torch.bool).scatter_(1, chosen, True)
    probs = torch.where(routing_map, scores, torch.zeros(()))
    return routing_map, probs


@pytest.mark.parametrize("tokens,experts,topk", [(64, 8, 2), (50, 16, 4), (7, 4, 4), (33, 32, 1)])
def test_sync_free_permutation_equals_megatron_core(tokens, experts, topk):
    routing_map, probs = routing(tokens, experts, topk, seed=tokens)
    hidden = torch.randn(tokens, 12, dtype=torch.float64)
    results = []
    for permute, unpermute in ((moe_utils.permute, moe_utils.unpermute), (dispatch.permute, dispatch.unpermute)):
        x = hidden.clone().requires_grad_()
        permuted, permuted_probs, indices = permute(x, routing_map, probs=probs, num_out_tokens=tokens * topk)
        # what the experts would do: scale each copy by its probability and by a per-row factor
        weights = torch.linspace(0.5, 2.0, permuted.shape[0], dtype=torch.float64)[:, None]
        out = unpermute(permuted * permuted_probs[:, None] * weights, indices, restore_shape=x.shape,
                        routing_map=routing_map)
        out.backward(torch.cos(torch.arange(out.numel(), dtype=torch.float64)).view_as(out))
        results.append((permuted.detach(), permuted_probs, indices.clone(), out.detach(), x.grad))
    for ours, theirs in zip(results[1], results[0]):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_token_dropping_keeps_megatron_cores_permutation():
    """A capacity factor makes the output size data-dependent: megatron-core's own code runs."""
    routing_map, probs = routing(20, 4, 2, seed=1)
    routing_map[0] = False  # a dropped token
    hidden = torch.randn(20, 6)
    count = torch.tensor(int(routing_map.sum()))
    ours = dispatch.permute(hidden, routing_map, probs=probs, num_out_tokens=count)
    theirs = moe_utils.permute(hidden, routing_map, probs=probs, num_out_tokens=count)
    assert not hasattr(ours[2], "copies_by_token")
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("padded", [True, False], ids=["padded", "dropless"])
def test_all_gather_dispatch_waits_once_for_the_count_and_not_at_all_when_padded(monkeypatch, padded):
    """The all-gather dispatcher's permutation (trainer.model.dispatch) hands the experts what
    megatron-core's does - tokens, counts, probabilities - reading only the count on the host
    (megatron-core: the counts, then two masked_selects), and nothing with experts padded."""
    from types import SimpleNamespace

    from megatron.core.transformer.moe.token_dispatcher import MoEAllGatherTokenDispatcher

    dispatch.install()
    ranks, rank_tokens, experts, topk = 2, 24, 8, 2
    maps, probs = [], []
    for rank in range(ranks):  # each rank's router; padded to capacity 1.0 by megatron-core's function
        routing_map, rank_probs = routing(rank_tokens, experts, topk, seed=rank)
        if padded:
            rank_probs, routing_map = moe_utils.apply_router_token_dropping(rank_probs, routing_map, topk, 1.0,
                                                                            pad_to_capacity=True)
        maps.append(routing_map)
        probs.append(rank_probs)
    gathered_map, gathered_probs = torch.cat(maps), torch.cat(probs)
    hidden = torch.randn(ranks * rank_tokens, 6)
    dispatcher = object.__new__(MoEAllGatherTokenDispatcher)  # its groups are not needed here
    dispatcher.config = SimpleNamespace(moe_pad_expert_input_to_capacity=padded, moe_permute_fusion=False,
                                        moe_router_topk=topk, num_moe_experts=experts, moe_expert_capacity_factor=1.0)
    dispatcher.tp_size, dispatcher.ep_size = 1, ranks
    dispatcher.num_local_experts, dispatcher.local_expert_indices = 4, [4, 5, 6, 7]  # the second rank's
    dispatcher.routing_map = gathered_map
    reads = []
    with monkeypatch.context() as patch:
        for name in ("cpu", "tolist", "item", "masked_select", "nonzero"):
            original = getattr(torch.Tensor, name)
            patch.setattr(torch.Tensor, name, lambda *a, _name=name, _original=original, **k: (
                reads.append(_name), _original(*a, **k))[1])
        permuted, counts, permuted_probs = dispatcher.dispatch_postprocess(hidden, gathered_probs)
    assert reads == ([] if padded else ["cpu"])
    # megatron-core's dispatch_postprocess, written out
    local_map = gathered_map[:, 4:]
    expected_counts = local_map.sum(dim=0)
    expected, _, _ = moe_utils.permute(hidden, local_map, num_out_tokens=int(expected_counts.sum()))
    expected_probs = gathered_probs[:, 4:].T.contiguous().masked_select(local_map.T.contiguous())
    assert counts.tolist() == expected_counts.tolist()
    if padded:
        assert counts.tolist() == [12] * 4  # capacity 6 from each of the two ranks
    torch.testing.assert_close(permuted, expected, rtol=0, atol=0)
    torch.testing.assert_close(permuted_probs, expected_probs, rtol=0, atol=0)


def test_gradient_norm_and_clipping_equal_megatron_cores_fallback():
    """One foreach norm (no host read per tensor) and foreach scaling give megatron-core's
    fallback results."""
    from megatron.core import utils

    from trainer.model import fused

    grads = [torch.randn(n, dtype=torch.float32) for n in (3, 70, 1000)] + [torch.randn(5, 5)]
    ours, _ = fused.l2_norm(0, None, [grads], False)
    theirs = torch.norm(torch.stack([torch.norm(g) for g in grads]))
    torch.testing.assert_close(ours, theirs.reshape(1))
    twins = [g.clone() for g in grads]
    fused.scale(0, None, [grads, grads], 0.25)  # in place, as clip_grad_by_total_norm_fp32 calls it
    copies = [torch.empty_like(g) for g in twins]
    fused.scale(0, None, [twins, copies], 0.25)
    for g, c, t in zip(grads, copies, twins):
        expected = torch.empty_like(t)
        utils.local_multi_tensor_scale(0, None, [[t], [expected]], 0.25)
        torch.testing.assert_close(g, expected)
        torch.testing.assert_close(c, expected)


OPTIMIZER_STEPS = """
import sys, tempfile, torch
torch.distributed.init_process_group("gloo", rank=0, world_size=1, init_method="file://" + tempfile.mktemp())
from trainer import devices, optimizer_step
devices.install_cpu_shim()
from megatron.core import parallel_state
parallel_state.initialize_model_parallel()
from megatron.core.optimizer import OptimizerConfig
from megatron.core.optimizer.optimizer import ChainedOptimizer, FP32Optimizer

def chained(clip, fused):
    # two parts with their own groups, as megatron-core chains dense and expert parameters
    torch.manual_seed(0)
    parts, params = [], []
    for sizes in ((5, 300), (64,)):
        group = [torch.nn.Parameter(torch.randn(n)) for n in sizes]
        # eps of the size of the gradients: a wrong gradient scale changes the update (Adam ignores a constant one)
        adam = torch.optim.AdamW(group, lr=0.1, eps=1.0, weight_decay=0.1, fused=fused, foreach=False if fused else None)
        parts.append(FP32Optimizer(adam, OptimizerConfig(lr=0.1, clip_grad=clip), None))
        params += group
    return ChainedOptimizer(parts), params

for clip in (0.5, 1000.0):  # clipping every step, and never
    for fused in (True, False):  # fused AdamW takes the clip factor as its grad_scale; others get it foreach
        theirs, ours = chained(clip, fused), chained(clip, fused)
        for step in range(3):
            torch.manual_seed(step)
            grads = [torch.randn(p.shape) * (step + 1) for p in theirs[1]]
            for _, params in (theirs, ours):
                for p, g in zip(params, grads):
                    p.main_grad = g.clone()
            ok, norm, _ = theirs[0].step()
            ok_ours, norm_ours = optimizer_step.step(ours[0])
            assert ok and ok_ours and torch.is_tensor(norm_ours), (ok, ok_ours, norm_ours)
            assert abs(norm_ours.item() - norm) <= 1e-5 * norm, (clip, fused, step, norm_ours.item(), norm)
            for a, b in zip(theirs[1], ours[1]):
                torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-5, atol=1e-6)
print("steps equal")
"""


def test_optimizer_step_on_the_device_equals_megatron_cores_step():
    """trainer.optimizer_step (the norm and the clip factor never read on the host) gives
    megatron-core's ChainedOptimizer step: the same gradient norm and the same weights after
    three steps, clipping or not, through fused AdamW's grad_scale and through foreach scaling."""
    import subprocess
    import sys

    from tests.conftest import REPO

    done = subprocess.run([sys.executable, "-c", OPTIMIZER_STEPS], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0 and "steps equal" in done.stdout, done.stderr[-3000:]


def test_flex_attention_document_mask_keeps_each_token_inside_its_sample():
    """FlexAttention's same-sample block mask (the GPU path for short packed samples) gives SDPA
    under the dense packed mask, forward, with grouped-query heads and samples that straddle its
    128-token blocks; its backward runs on GPUs only (bench/gpu_speed.py checks it there)."""
    import numpy as np

    from trainer.data.batches import sample_boundaries
    from trainer.model import attention

    rows, length, heads, kv_heads, dim = 2, 320, 4, 2, 16
    rng = np.random.default_rng(0)
    sample = np.stack([np.repeat(np.arange(40), rng.integers(3, 40, 40))[:length] for _ in range(rows)])
    sample[1, -37:] = -1  # a padding run, a sample of its own
    cu = torch.from_numpy(sample_boundaries(list(sample)))
    cu.sample_ids = torch.from_numpy(sample)
    layer = attention.SDPAttention.__new__(attention.SDPAttention)
    torch.nn.Module.__init__(layer)
    layer.cp_size, layer.dropout, layer.softmax_scale = 1, 0.0, dim ** -0.5
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(length, rows, heads, dim, generator=generator)
    k, v = (torch.randn(length, rows, kv_heads, dim, generator=generator) for _ in range(2))
    dense = layer.forward(q, k, v, attention.boundaries_to_mask(cu, rows, length))
    flex = layer._attend_flex(q, k, v, cu)
    assert torch.allclose(flex, dense, atol=1e-5)
    causal_only = layer.forward(q, k, v, None)  # a mask that let samples see each other would give this
    assert not torch.allclose(flex, causal_only, atol=1e-3)
    # transformer-engine's THD form (its layer spec takes this path on short samples): the same
    # rows laid end to end, [rows x length, heads, dim], attended row by row
    from megatron.core.packed_seq_params import PackedSeqParams

    params = PackedSeqParams(qkv_format="thd")
    params.sample_ids = torch.from_numpy(sample)
    thd = lambda t: t.transpose(0, 1).reshape(rows * length, *t.shape[2:])  # noqa: E731
    out = attention.attend_packed_rows(thd(q), thd(k), thd(v), params, dim ** -0.5)
    assert torch.allclose(out, thd(dense.view(length, rows, heads, dim)).reshape(rows * length, -1), atol=1e-5)


@pytest.mark.parametrize("counted", [False, True], ids=["all-tokens", "response-tokens"])
@pytest.mark.parametrize("weight_trains", [True, False], ids=["full", "frozen-output"])
def test_output_loss_in_chunks_gives_the_cross_entropy_and_its_gradients(monkeypatch, weight_trains, counted):
    """The output layer and loss in chunks (trainer.model.output_loss, 3 chunks, the last one
    short) against cross-entropy of the whole logits in float64: per-token losses, and the
    gradients of the masked sum under a gradient scale, which is how the trainer's loss uses them.
    Labels outside the mask are padding (-100). With the response tokens counted on the host (as
    collate does) only they go through the output layer, and the other tokens' losses are zero."""
    from trainer.model import output_loss

    length, rows, width, vocab = 100, 3, 16, 50
    monkeypatch.setattr(output_loss, "LOGIT_ELEMENTS_PER_CHUNK", 128 * vocab)  # 128-token chunks
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(length, rows, width, generator=generator)
    weight = torch.randn(vocab, width, generator=generator) / 4
    labels = torch.randint(0, vocab, (rows, length), generator=generator)
    mask = (torch.rand(rows, length, generator=generator) > 0.4).float()
    mask[1] = 0  # a row with no response token
    labels[mask == 0] = -100
    if counted:
        mask.response_tokens = int((mask > 0).sum())

    def masked_sum(losses):
        return 0.5 * torch.where(mask > 0, losses, 0.0).sum()  # 0.5: a gradient scale

    results = []
    for fused_path in (True, False):
        h = hidden.clone().double().requires_grad_()
        w = weight.clone().double().requires_grad_(weight_trains)
        if fused_path:
            h32, w32 = h.float(), w.float()
            losses = output_loss.linear_cross_entropy(h32, w32, labels, mask)
        else:
            logits = (h @ w.t()).transpose(0, 1)  # [rows, length, vocab]
            losses = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), labels.reshape(-1).clamp(min=0),
                                                       reduction="none").view(rows, length)
        masked_sum(losses).backward()
        results.append((losses.detach().double(), h.grad, w.grad))
        with torch.no_grad():  # validation: losses only
            if fused_path:
                torch.testing.assert_close(output_loss.linear_cross_entropy(hidden, weight, labels, mask).double(),
                                           results[0][0])
    (ours_loss, ours_h, ours_w), (ref_loss, ref_h, ref_w) = results
    assert ours_loss.shape == (rows, length)
    torch.testing.assert_close(ours_loss[mask > 0], ref_loss[mask > 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_h, ref_h, rtol=1e-5, atol=1e-6)
    assert ours_h[:, 1].abs().max() == 0  # the row without response tokens gets no gradient
    if counted:
        assert ours_loss[mask == 0].abs().max() == 0
    else:
        torch.testing.assert_close(ours_loss, ref_loss, rtol=1e-5, atol=1e-5)
    if weight_trains:
        torch.testing.assert_close(ours_w, ref_w, rtol=1e-5, atol=1e-6)
    else:
        assert ours_w is None


def test_gradients_added_by_hook_reach_the_main_gradient_once_per_micro_batch():
    """fused.add_grads_by_hook under megatron-core DDP's contract (its post-accumulation hook adds
    `param.grad` into `main_grad` unless `grad_added_to_main_grad` is set, and it clears the flag
    every step): over three micro-batches the main gradients hold the sum of the three gradients,
    for a plain parameter and for one whose layer accumulates its own (gradient-accumulation
    fusion: it sets the flag and hands autograd a placeholder), and again after the next step's
    reset."""
    from trainer.model import fused

    class FusedLinear(torch.autograd.Function):  # megatron-core's linear with gradient-accumulation fusion
        @staticmethod
        def forward(ctx, x, weight):
            ctx.save_for_backward(x, weight)
            return x @ weight.t()

        @staticmethod
        def backward(ctx, grad):
            x, weight = ctx.saved_tensors
            weight.main_grad.add_(grad.t() @ x)
            weight.grad_added_to_main_grad = True
            return grad @ weight, torch.empty_like(weight)  # the placeholder: never added

    torch.manual_seed(0)
    plain = torch.nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
    fused_weight = torch.nn.Parameter(torch.randn(5, 3, dtype=torch.float64))
    module = torch.nn.Module()
    module.plain, module.fused_weight = plain, fused_weight

    def ddp_hook(param):  # distributed_data_parallel.py: _make_backward_post_hook
        def hook(*unused):
            if param.grad is not None and not param.grad_added_to_main_grad:
                param.main_grad.add_(param.grad.data)
            param.grad = None
        return hook

    keep = []  # the AccumulateGrad nodes, as DDP keeps them
    for param in (plain, fused_weight):
        param.main_grad = torch.zeros_like(param)
        param.grad_added_to_main_grad = False
        accumulate = param.expand_as(param).grad_fn.next_functions[0][0]
        accumulate.register_hook(ddp_hook(param))
        keep.append(accumulate)
    fused.add_grads_by_hook([module])

    for step in range(2):
        for param in (plain, fused_weight):  # zero_grad_buffer
            param.main_grad.zero_()
            param.grad_added_to_main_grad = False
        expected = [torch.zeros_like(plain), torch.zeros_like(fused_weight)]
        for micro_batch in range(3):
            x = torch.randn(6, 4, dtype=torch.float64)
            (FusedLinear.apply(x @ plain.t(), fused_weight) ** 2).sum().backward()
            with torch.enable_grad():
                p, f = plain.detach().requires_grad_(), fused_weight.detach().requires_grad_()
                (((x @ p.t()) @ f.t()) ** 2).sum().backward()
            expected[0] += p.grad
            expected[1] += f.grad
        assert torch.allclose(plain.main_grad, expected[0]) and torch.allclose(fused_weight.main_grad, expected[1])
