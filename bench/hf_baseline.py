"""The same model in Hugging Face transformers, one GPU: the reference the trainer is compared
with. Its fastest settings: grouped_mm experts (transformers' default where torch has
_grouped_mm), SDPA attention, fused AdamW, bf16 weights; full-length rows of random tokens
(one 4096-token causal sequence per row). Prints one JSON line.

    python bench/hf_baseline.py MODEL_DIR [--micro-batch 4] [--rows 8] [--steps 8] [--length 4096]
"""

import argparse
import json
import statistics
import time

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

parser = argparse.ArgumentParser()
parser.add_argument("path")
parser.add_argument("--micro-batch", type=int, default=1)
parser.add_argument("--rows", type=int, default=8, help="rows per optimizer step (the trainer's global batch)")
parser.add_argument("--steps", type=int, default=8)
parser.add_argument("--length", type=int, default=4096)
args = parser.parse_args()

config = AutoConfig.from_pretrained(args.path)
model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa").cuda()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
accumulate = args.rows // args.micro_batch
times, losses = [], []
for step in range(args.steps):
    torch.cuda.synchronize()
    start = time.time()
    for _ in range(accumulate):
        tokens = torch.randint(0, config.vocab_size, (args.micro_batch, args.length), device="cuda")
        loss = model(input_ids=tokens, labels=tokens).loss / accumulate
        loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    times.append(time.time() - start)
    losses.append(float(loss) * accumulate)
steady = times[2:]
print(json.dumps({
    "name": "hf", "micro_batch_size": args.micro_batch, "transformers": transformers.__version__,
    "experts_implementation": getattr(model.config, "_experts_implementation", None),
    "attention": model.config._attn_implementation,
    "step_time_s": round(statistics.median(steady), 4),
    "tokens_per_s": round(args.rows * args.length / statistics.median(steady), 1),
    "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
    "loss_first_last": [round(losses[0], 4), round(losses[-1], 4)],
}))
