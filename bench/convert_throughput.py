"""Conversion throughput and peak memory on this machine: a synthetic Mixtral-shaped checkpoint
of a few GB (scripts/synthetic_checkpoint.py), converted hf-to-mcore and back with
`launcher convert`, timed from outside; results in bench/results/convert_cpu<cores>_nproc<n>.json.

    python bench/convert_throughput.py [--gb 3] [--workdir /tmp/moe-convert-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
from synthetic_checkpoint import write  # noqa: E402


def run(*args) -> tuple[dict, float]:
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "launcher", "convert", *map(str, args), "--json"], cwd=REPO,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    return json.loads(proc.stdout.splitlines()[-1]), time.time() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gb", type=float, default=3.0, help="checkpoint size (bf16)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/moe-convert-bench"))
    parser.add_argument("--nproc", type=int, default=1)
    args = parser.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    # 8 layers of 8 experts at hidden 2048; the FFN width sets the size.
    hidden, layers, experts = 2048, 8, 8
    ffn = int(args.gb * 1e9 / 2 / (layers * experts * 3 * hidden)) // 128 * 128
    made = write(args.workdir / "hf", layers=layers, hidden=hidden, ffn=ffn, experts=experts, vocab=32000,
                 heads=16, kv_heads=4, shard_mib=1024)
    extra = ["--nproc", args.nproc] if args.nproc > 1 else []
    to_mcore, wall_in = run("hf-to-mcore", "--hf-model-path", args.workdir / "hf", "--output-path",
                            args.workdir / "mcore", *extra)
    to_hf, wall_out = run("mcore-to-hf", "--mcore-path", args.workdir / "mcore", "--hf-model-path",
                          args.workdir / "hf", "--output-path", args.workdir / "back", "--shard-size-gib", "1", *extra)
    result = {
        "machine": {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "checkpoint": {"bytes": made["bytes"], "shards": made["shards"], "largest_shard_bytes": made["largest_shard"],
                       "layers": layers, "hidden": hidden, "ffn": ffn, "experts": experts, "dtype": "bfloat16"},
        "nproc": args.nproc,
        "hf_to_mcore": {**to_mcore, "wall_s_with_startup": round(wall_in, 2)},
        "mcore_to_hf": {**to_hf, "wall_s_with_startup": round(wall_out, 2)},
    }
    out = REPO / "bench" / "results" / f"convert_cpu{os.cpu_count()}_nproc{args.nproc}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
