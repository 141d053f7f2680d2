"""Chat templates and loss masks: only the assistant's tokens are learned.

The conversation is rendered once with the model's own chat template; each assistant
turn's span of text is found by rendering the conversation up to that turn with and
without it, and the tokens whose characters fall in those spans get loss.
"""

from __future__ import annotations

from trainer.data.parquet import BadRow


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    if not tokenizer.chat_template:
        raise ValueError(f"{path}: the tokenizer has no chat template (tokenizer_config.json: chat_template)")
    return tokenizer


def tokenize_conversation(tokenizer, messages: list[dict], where: str) -> tuple[list[int], list[int]]:
    """Token ids of the whole conversation and a 0/1 mask of the assistant tokens."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not text.startswith(upto) or not upto.startswith(before):
            raise BadRow(f"{where}: the chat template does not render turn {i} as a prefix of the conversation; "
                         "its loss mask cannot be found")
        spans.append((len(before), len(upto)))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    mask = [0] * len(ids)
    for t, (start, end) in enumerate(encoded["offset_mapping"]):
        if any(start >= a and end <= b and end > start for a, b in spans):
            mask[t] = 1
    return ids, mask
