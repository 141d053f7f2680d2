"""Writes the tiny model's tokenizer and its small SFT data set (both committed).

    python scripts/make_tiny_assets.py

The tasks are small and learnable in a minute on a CPU: reverse, sort or count a few
words, and answer from a fixed table of facts. The same seed gives the same files.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "recipes" / "models" / "tiny_moe"
DATA = ROOT / "recipes" / "data"
WORDS = "apple river stone cloud green tiger piano lemon orbit candle maple silver ocean violet".split()
FACTS = {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Egypt": "Cairo", "Peru": "Lima",
         "Kenya": "Nairobi", "Norway": "Oslo", "Chile": "Santiago", "Spain": "Madrid", "Cuba": "Havana"}
SPECIALS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|eos|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def example(rng: random.Random) -> dict:
    words = rng.sample(WORDS, rng.randint(2, 5))
    kind = rng.choice(["reverse", "sort", "count", "capital"])
    if kind == "reverse":
        return {"prompt": "Reverse: " + " ".join(words), "response": " ".join(reversed(words))}
    if kind == "sort":
        return {"prompt": "Sort: " + " ".join(words), "response": " ".join(sorted(words))}
    if kind == "count":
        return {"prompt": "Count: " + " ".join(words), "response": f"{len(words)} words"}
    country = rng.choice(sorted(FACTS))
    return {"prompt": f"What is the capital of {country}?", "response": f"The capital of {country} is {FACTS[country]}."}


def main() -> None:
    rng = random.Random(1234)
    train = [example(rng) for _ in range(1200)]
    val = [example(rng) for _ in range(64)]
    DATA.mkdir(parents=True, exist_ok=True)
    for rows, name in ((train, "tiny_sft.parquet"), (val, "tiny_sft_val.parquet")):
        table = pa.table({"prompt": [r["prompt"] for r in rows], "response": [r["response"] for r in rows]})
        pq.write_table(table, DATA / name, row_group_size=200)

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = [f"{r['prompt']}\n{r['response']}" for r in train]
    tokenizer.train_from_iterator(corpus, trainer)
    MODEL.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(MODEL / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>", "eos_token": "<|eos|>",
              "pad_token": "<|pad|>", "model_max_length": 1024, "chat_template": CHAT_TEMPLATE}
    (MODEL / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"vocabulary {tokenizer.get_vocab_size()}; {len(train)} train and {len(val)} validation rows")


if __name__ == "__main__":
    main()
