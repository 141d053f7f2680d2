"""The expert-parallel all-to-all alone, on the GPUs of one host: what the trainer's exchange
of routed tokens costs without the model around it (no routing imbalance, no host waits).

    torchrun --standalone --nproc-per-node N bench/alltoall.py NAME [--rows 65536] [--hidden 2048]

Each rank sends `rows` bf16 rows of `hidden` (one micro-batch's routed copies: 4 x 4096 tokens
x top-4 for qwen3_moe_8l) in equal parts to every rank, and then the routing probabilities
(`rows` fp32 values) the same way, as megatron-core's dispatcher does. Times both with CUDA
events after a barrier (median of 20 after 5 warm-ups) and appends a row for N GPUs to
$OUT/NAME.json (bench/out/ without $OUT): milliseconds, and GB/s per GPU counting the bytes
that leave it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import torch
import torch.distributed as dist


def timed_ms(send: torch.Tensor, receive: torch.Tensor, repeats: int = 20) -> float:
    times = []
    for attempt in range(5 + repeats):
        dist.barrier()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dist.all_to_all_single(receive, send)
        end.record()
        torch.cuda.synchronize()
        if attempt >= 5:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("name")
    parser.add_argument("--rows", type=int, default=65536)
    parser.add_argument("--hidden", type=int, default=2048)
    args = parser.parse_args()
    rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl")
    ranks = dist.get_world_size()
    tokens = torch.randn(args.rows, args.hidden, device="cuda", dtype=torch.bfloat16)
    probs = torch.rand(args.rows, device="cuda")
    tokens_ms = timed_ms(tokens, torch.empty_like(tokens))
    probs_ms = timed_ms(probs, torch.empty_like(probs))
    leaving = tokens.numel() * tokens.element_size() * (ranks - 1) / ranks
    if rank == 0:
        out = Path(os.environ.get("OUT", Path(__file__).parent / "out")) / f"{args.name}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        result = json.loads(out.read_text()) if out.exists() else {
            "device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
        result["rows"].append({"gpus": ranks, "rows_sent": args.rows, "hidden": args.hidden,
                               "tokens_ms": round(tokens_ms, 3), "probs_ms": round(probs_ms, 3),
                               "gb_s_per_gpu": round(leaving / tokens_ms / 1e6, 1)})
        out.write_text(json.dumps(result, indent=1))
        print(json.dumps(result["rows"][-1]), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
