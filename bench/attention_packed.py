"""Attention over packed samples on one GPU: flash varlen against FlexAttention's document mask.

    python3 bench/attention_packed.py NAME [--cp N]

The benchmark model's attention shape (16 query heads, 4 key/value heads, head_dim 128, bf16),
8 rows of 4096 tokens, forward and backward, for three sample-length mixes: short samples
(8-32 tokens, like the bundled SFT set), SFT-length samples (64-2048) and one sample per row.
Each path's output and input gradients are checked against the dense-mask SDPA reference
(asserts); writes bench/results/NAME.json (and $OUT/NAME.json). With --cp N: one context-parallel
rank's attention at a time (its two chunks of each row against the whole rows' keys, the all-gather
left out), the pieces through flash (trainer.model.cp_attention) against SDPA under the rank's
rows of the dense mask (the path they replaced).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from trainer.model import attention  # noqa: E402

ROWS, LENGTH, HEADS, KV_HEADS, DIM = 8, 4096, 16, 4, 128
MIXES = {"short": (8, 32), "sft": (64, 2048), "one_per_row": (LENGTH, LENGTH)}


def sample_ids(low: int, high: int, rng) -> np.ndarray:
    """[rows, length] sample index of every token, samples of random lengths packed row by row."""
    rows, first = [], 0
    for _ in range(ROWS):
        ids, used = [], 0
        while used < LENGTH:
            n = min(int(rng.integers(low, high + 1)), LENGTH - used)
            ids += [first] * n
            used, first = used + n, first + 1
        rows.append(ids)
    return np.array(rows, dtype=np.int64)


def timed(fn, steps: int = 10) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    name = sys.argv[1]
    rng = np.random.default_rng(0)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "shape": dict(rows=ROWS, length=LENGTH, heads=HEADS, kv_heads=KV_HEADS, head_dim=DIM), "mixes": {}}
    if "--cp" in sys.argv:
        return context_parallel(name, int(sys.argv[sys.argv.index("--cp") + 1]), rng, results)
    layer = attention.SDPAttention.__new__(attention.SDPAttention)
    torch.nn.Module.__init__(layer)
    layer.cp_size, layer.dropout, layer.softmax_scale = 1, 0.0, DIM ** -0.5
    for mix, (low, high) in MIXES.items():
        ids = sample_ids(low, high, rng)
        flat = ids.reshape(-1)
        starts = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]]).astype(np.int32)
        cu = torch.from_numpy(starts).cuda()
        cu.max_seqlen = int(np.diff(starts).max())
        cu.sample_ids = torch.from_numpy(ids).cuda()
        cu.mean_sample = float(np.diff(starts).mean())
        q = torch.randn(LENGTH, ROWS, HEADS, DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k, v = (torch.randn(LENGTH, ROWS, KV_HEADS, DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                for _ in range(2))
        grad = torch.randn(LENGTH, ROWS, HEADS * DIM, device="cuda", dtype=torch.bfloat16)

        def run(path):
            for t in (q, k, v):
                t.grad = None
            if path == "dense":
                out = layer.forward(q, k, v, attention.boundaries_to_mask(cu, ROWS, LENGTH))
            elif path == "varlen":
                out = layer._attend_samples(q, k, v, cu)
            else:
                out = layer._attend_flex(q, k, v, cu)
            out.backward(grad)
            return out.detach(), [t.grad.clone() for t in (q, k, v)]

        ref_out, ref_grads = run("dense")
        row = {"samples": int(starts.size - 1), "mean_length": float(np.diff(starts).mean())}
        for path in ("varlen", "flex"):
            out, grads = run(path)
            errors = [attention_error(a, b) for a, b in zip([out, *grads], [ref_out, *ref_grads])]
            assert max(errors) < 2e-2, (mix, path, errors)
            if path == "flex":
                cu.__dict__.pop("block_mask", None)  # time the mask's construction too, once per call
                ms = timed(lambda: (cu.__dict__.pop("block_mask", None), run(path)))
            else:
                ms = timed(lambda: run(path))
            row[path] = {"ms_forward_backward": round(ms, 3), "max_rel_error": max(errors)}
        row["dense_ms"] = round(timed(lambda: run("dense"), steps=3), 3)
        results["mixes"][mix] = row
        print(mix, json.dumps(row), flush=True)
        save(name, results)  # after each mix: a run stopped at its time limit keeps what it measured


def context_parallel(name: str, cp: int, rng, results: dict) -> None:
    from trainer.model import cp_attention

    results["cp"] = cp
    chunk = LENGTH // (2 * cp)
    for mix, (low, high) in MIXES.items():
        ids = sample_ids(low, high, rng).reshape(-1)
        starts = np.concatenate([[0], np.flatnonzero(np.diff(ids)) + 1, [ids.size]]).astype(np.int32)
        starts = np.union1d(starts, np.arange(0, ROWS * LENGTH + 1, LENGTH)).astype(np.int32)  # rows start samples
        cu = torch.from_numpy(starts).cuda()
        k, v = (torch.randn(LENGTH, ROWS, KV_HEADS, DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                for _ in range(2))
        row = {"samples": int(starts.size - 1)}
        for rank in range(cp):
            mine = torch.from_numpy(cp_attention.rank_positions(LENGTH, cp, rank)).cuda()
            mask = attention.boundaries_to_mask(cu, ROWS, LENGTH)[:, :, mine]
            spans = cp_attention.spans_on_device(cp_attention.rank_spans(starts, ROWS, LENGTH, cp, rank), "cuda")
            q = torch.randn(2 * chunk, ROWS, HEADS, DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            grad = torch.randn(2 * chunk, ROWS, HEADS * DIM, device="cuda", dtype=torch.bfloat16)

            def run(path):
                for t in (q, k, v):
                    t.grad = None
                if path == "dense":
                    qh, kh, vh = (t.permute(1, 2, 0, 3) for t in (q, k, v))
                    out = torch.nn.functional.scaled_dot_product_attention(
                        qh, kh.repeat_interleave(HEADS // KV_HEADS, 1), vh.repeat_interleave(HEADS // KV_HEADS, 1),
                        attn_mask=~mask, scale=DIM ** -0.5).permute(2, 0, 1, 3).reshape(2 * chunk, ROWS, -1)
                else:
                    keys_values = cp_attention.in_gathered_order(k, v, cp)
                    out = cp_attention.attend(q, keys_values, DIM, spans, DIM ** -0.5, attention._varlen_attn())
                out.backward(grad)
                return out.detach(), [t.grad.clone() for t in (q, k, v)]

            reference, found = run("dense"), run("pieces")
            errors = [attention_error(a, b) for a, b in zip([found[0], *found[1]], [reference[0], *reference[1]])]
            assert max(errors) < 2e-2, (mix, rank, errors)
            row[f"rank{rank}"] = {"dense_ms": round(timed(lambda: run("dense"), steps=5), 3),
                                  "pieces_ms": round(timed(lambda: run("pieces")), 3), "max_rel_error": max(errors)}
        results["mixes"][mix] = row
        print(mix, json.dumps(row), flush=True)
        save(name, results)


def save(name: str, results: dict) -> None:
    text = json.dumps(results, indent=1)
    (REPO / "bench" / "results" / f"{name}.json").write_text(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], f"{name}.json").write_text(text)


def attention_error(out, ref) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


if __name__ == "__main__":
    main()
