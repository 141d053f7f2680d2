"""Chat templates and loss masks: only the assistant's tokens are learned.

The conversation is rendered once with the model's own chat template and tokenized once;
tokens whose characters fall inside an assistant turn's span get loss. Templates need not be
prefix-stable: Qwen3's renders a thinking block only for assistant turns after the last user
message, so the conversation cut before a turn renders that turn unlike the whole does. Each
assistant turn's span is found inside the whole rendering instead:

- where it starts: render the conversation again with that turn replaced by a marker; the two
  renderings agree up to the turn's own text (its reasoning, content or tool calls). If the
  template's generation prompt, rendered after the turns before it, is a prefix of the whole,
  the turn starts right after that prompt instead: what the model generates after the prompt
  (Qwen3's thinking block included) is learned, the prompt itself never (also where it holds
  text the turn renders too, such as an empty thinking block under enable_thinking: false);
- where it ends: the two renderings agree again after the turn's text; the turn takes in the
  end-of-turn text that the template writes after an assistant message (`<|im_end|>\\n`,
  `</s>`, ...), read off a rendering that ends with the marker turn. A template that leaves
  the final message open (Qwen1.5's writes `<|im_end|>` only between turns) would never teach
  the model to stop: where it closes earlier assistant turns with the tokenizer's end-of-sequence
  token, that token ends every assistant turn, and is added after an open final one.

System, user and tool turns are never learned. A turn whose span cannot be located is a
BadRow naming the turn.
"""

from __future__ import annotations

from jinja2 import TemplateError

from trainer.data.parquet import BadRow

MARKER = "\ue000moe-launcher-assistant-turn\ue001"  # private-use characters: in no real text


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    if not tokenizer.chat_template:
        raise ValueError(f"{path}: the tokenizer has no chat template (tokenizer_config.json: chat_template)")
    return tokenizer


def tokenize_conversation(tokenizer, messages: list[dict], where: str,
                          template_kwargs: dict | None = None) -> tuple[list[int], list[int]]:
    """Token ids of the whole conversation and a 0/1 mask of the assistant tokens.
    `template_kwargs` go to every rendering (data.apply_chat_template_kwargs)."""
    text, spans = assistant_spans(tokenizer, messages, where, template_kwargs or {})
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    mask = [0] * len(ids)
    for t, (start, end) in enumerate(encoded["offset_mapping"]):
        if end > start and any(start >= a and end <= b for a, b in spans):
            mask[t] = 1
    return ids, mask


def render(tokenizer, messages: list[dict], kwargs: dict, generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt, **kwargs)


def assistant_spans(tokenizer, messages: list[dict], where: str, kwargs: dict) -> tuple[str, list[tuple[int, int]]]:
    """The whole rendering and the [start, end) character spans of its assistant turns."""
    try:
        text = render(tokenizer, messages, kwargs)
    except (TemplateError, TypeError) as err:  # raise_exception(...) in the template, or a None it adds to text
        hint = ""
        if any(m.get("tool_calls") and not m.get("content") for m in messages):
            # transformers drops keys whose value is None before rendering; DeepSeek-V3's template
            # tells a tool call by `content is none`, so it cannot render one through transformers
            hint = ("; a tool-call turn without content reaches the template without a 'content' key "
                    "(transformers drops None values), which this template does not handle")
        raise BadRow(f"{where}: the chat template refuses the conversation: {err}{hint}") from None
    spans = []
    closing = None  # the end-of-turn of a template that leaves the final turn open, found once
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        marked = render(tokenizer, [*messages[:i], {"role": "assistant", "content": MARKER}, *messages[i + 1:]], kwargs)
        if MARKER not in marked:
            raise BadRow(f"{where}: turn {i}: the chat template does not render an assistant message's content")
        start = _common_prefix(text, marked)
        end = len(text) - _common_suffix(text, marked, limit=len(text) - start)
        prompt = render(tokenizer, messages[:i], kwargs, generation_prompt=True) if i else ""
        if i and text.startswith(prompt) and len(prompt) < end:
            start = len(prompt)
        last = render(tokenizer, [*messages[:i], {"role": "assistant", "content": MARKER}], kwargs)
        end_of_turn = last[last.index(MARKER) + len(MARKER):]
        if not end_of_turn:
            if closing is None:
                closing = _closing_token(tokenizer, messages[:i], kwargs)
            end_of_turn = closing
            if end == len(text):
                text += end_of_turn
        if not text.startswith(end_of_turn, end):
            raise BadRow(f"{where}: turn {i}: the chat template's end of an assistant turn "
                         f"({end_of_turn!r}) does not follow the turn in the conversation; its loss mask "
                         "cannot be found")
        if end <= start:
            raise BadRow(f"{where}: turn {i}: the assistant turn renders no text of its own; nothing to learn")
        spans.append((start, end + len(end_of_turn)))
    return text, spans


def _closing_token(tokenizer, before: list[dict], kwargs: dict) -> str:
    """The end-of-sequence token, if the template writes it right after an assistant turn that
    another message follows; else "" (the template ends turns with nothing)."""
    eos = tokenizer.eos_token or ""
    follow = [*before, {"role": "assistant", "content": MARKER}, {"role": "user", "content": "?"}]
    try:
        probe = render(tokenizer, follow, kwargs)
    except Exception:  # noqa: BLE001 - a template that refuses the probe's order: no evidence either way
        return ""
    return eos if eos and probe.startswith(eos, probe.index(MARKER) + len(MARKER)) else ""


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _common_suffix(a: str, b: str, limit: int) -> int:
    n = min(len(a), len(b), limit)
    i = 0
    while i < n and a[-1 - i] == b[-1 - i]:
        i += 1
    return i
