"""Write a random Mixtral-shaped Hugging Face checkpoint of a chosen size, shard by shard
(never the whole model in memory), for conversion tests and benchmarks.

    python scripts/synthetic_checkpoint.py OUT --layers 8 --hidden 2048 --ffn 4096 --experts 8 --shard-mib 512
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def mixtral_shapes(layers: int, hidden: int, ffn: int, experts: int, vocab: int, heads: int, kv_heads: int) -> dict:
    head_dim = hidden // heads
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes.update({f"{p}.input_layernorm.weight": (hidden,), f"{p}.post_attention_layernorm.weight": (hidden,),
                       f"{p}.self_attn.q_proj.weight": (heads * head_dim, hidden),
                       f"{p}.self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
                       f"{p}.self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
                       f"{p}.self_attn.o_proj.weight": (hidden, heads * head_dim),
                       f"{p}.block_sparse_moe.gate.weight": (experts, hidden)})
        for e in range(experts):
            q = f"{p}.block_sparse_moe.experts.{e}"
            shapes.update({f"{q}.w1.weight": (ffn, hidden), f"{q}.w3.weight": (ffn, hidden), f"{q}.w2.weight": (hidden, ffn)})
    return shapes


def write(out: Path, layers: int = 4, hidden: int = 512, ffn: int = 1024, experts: int = 8, vocab: int = 4096,
          heads: int = 8, kv_heads: int = 4, shard_mib: float = 32, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Returns {"bytes": total, "largest_shard": bytes, "shards": count}."""
    out.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": hidden,
              "intermediate_size": ffn, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv_heads, "num_local_experts": experts, "num_experts_per_tok": 2,
              "vocab_size": vocab, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
              "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": str(dtype).removeprefix("torch.")}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    generator = torch.Generator().manual_seed(0)
    element = torch.tensor([], dtype=dtype).element_size()
    groups, current, size = [], [], 0
    for name, shape in mixtral_shapes(layers, hidden, ffn, experts, vocab, heads, kv_heads).items():
        nbytes = element * int(torch.Size(shape).numel())
        if current and size + nbytes > shard_mib * 2**20:
            groups.append((current, size))
            current, size = [], 0
        current.append((name, shape))
        size += nbytes
    groups.append((current, size))
    weight_map, total = {}, 0
    for i, (names, size) in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: (torch.randn(s, generator=generator) * 0.02).to(dtype) for n, s in names}
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        weight_map.update({n: file for n, _ in names})
        total += size
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    return {"bytes": total, "largest_shard": max(size for _, size in groups), "shards": len(groups)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    for name, default in (("layers", 4), ("hidden", 512), ("ffn", 1024), ("experts", 8), ("vocab", 4096)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--shard-mib", type=float, default=32)
    a = parser.parse_args()
    print(json.dumps(write(a.out, a.layers, a.hidden, a.ffn, a.experts, a.vocab, shard_mib=a.shard_mib)))
