"""The expert-parallel all-to-all alone, on the GPUs of one host: what the trainer's exchange
of routed tokens costs without the model around it (no routing imbalance, no host waits).

    torchrun --standalone --nproc-per-node N bench/alltoall.py NAME [--rows 65536] [--hidden 2048]
    bench/alltoall.py --sweep NAME   (on a host of 4 GPUs: NCCL_SETTINGS below, on 2 and 4 GPUs)

Each rank sends `rows` bf16 rows of `hidden` (one micro-batch's routed copies: 4 x 4096 tokens
x top-4 for qwen3_moe_8l) in equal parts to every rank, and then the routing probabilities
(`rows` fp32 values) the same way, as megatron-core's dispatcher does. Times both with CUDA
events after a barrier (median of 20 after 5 warm-ups) and appends a row for N GPUs to
$OUT/NAME.json (bench/out/ without $OUT): milliseconds, GB/s per GPU counting the bytes
that leave it, and the NCCL variables it ran with (NCCL reads them once, as a communicator starts:
each setting is its own run).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
from pathlib import Path

import torch
import torch.distributed as dist


# NCCL settings that shape point-to-point traffic over NVLink (all-to-all is point-to-point):
# channels (one thread block each) per peer, the chunk each step moves, the staging buffer, protocol.
NCCL_SETTINGS = [
    {},
    {"NCCL_MIN_P2P_NCHANNELS": "32"},
    {"NCCL_MIN_P2P_NCHANNELS": "64", "NCCL_MAX_P2P_NCHANNELS": "64"},
    {"NCCL_P2P_NVL_CHUNKSIZE": "1048576"},
    {"NCCL_P2P_NVL_CHUNKSIZE": "2097152", "NCCL_BUFFSIZE": "16777216"},
    {"NCCL_MIN_NCHANNELS": "32"},
    {"NCCL_PROTO": "Simple"},
    {"NCCL_MIN_P2P_NCHANNELS": "32", "NCCL_P2P_NVL_CHUNKSIZE": "1048576", "NCCL_BUFFSIZE": "16777216"},
]


def sweep(name: str) -> None:
    for gpus in (2, 4):
        for setting in NCCL_SETTINGS:
            subprocess.run(["torchrun", "--standalone", f"--nproc-per-node={gpus}", __file__, name],
                           env={**os.environ, **setting}, check=False, timeout=120)


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
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--rows", type=int, default=65536)
    parser.add_argument("--hidden", type=int, default=2048)
    args = parser.parse_args()
    if args.sweep:
        return sweep(args.name)
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
            "device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "nccl": ".".join(map(str, torch.cuda.nccl.version())), "rows": []}
        result["rows"].append({"gpus": ranks, "rows_sent": args.rows, "hidden": args.hidden,
                               "tokens_ms": round(tokens_ms, 3), "probs_ms": round(probs_ms, 3),
                               "gb_s_per_gpu": round(leaving / tokens_ms / 1e6, 1),
                               "nccl_env": {k: v for k, v in os.environ.items()
                                            if k.startswith("NCCL_") and k != "NCCL_NVLS_ENABLE"}})
        out.write_text(json.dumps(result, indent=1))
        print(json.dumps(result["rows"][-1]), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
