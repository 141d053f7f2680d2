"""The same mid-size Qwen3-MoE in Hugging Face transformers (its own MoE kernels, SDPA, bf16),
one GPU, sequence 4096: the reference the TE-free trainer is compared with.

    python bench/hf_baseline.py bench/models/qwen3_moe_mid [steps]
"""

import json
import statistics
import sys
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

path, steps = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 8
config = AutoConfig.from_pretrained(path)
config._attn_implementation = "sdpa"
model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16).cuda()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
micro_batches, length = 8, 4096  # the trainer's global batch: 8 rows of 4096 tokens
times = []
for step in range(steps):
    torch.cuda.synchronize()
    start = time.time()
    for _ in range(micro_batches):
        tokens = torch.randint(0, config.vocab_size, (1, length), device="cuda")
        loss = model(input_ids=tokens, labels=tokens).loss / micro_batches
        loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    torch.cuda.synchronize()
    times.append(time.time() - start)
steady = times[2:]
result = {"model": path, "transformers": __import__("transformers").__version__, "torch": torch.__version__,
          "experts_implementation": getattr(config, "_experts_implementation", None),
          "step_time_s_median": round(statistics.median(steady), 3),
          "tokens_per_s_median": round(micro_batches * length / statistics.median(steady), 1),
          "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
print(json.dumps(result))
