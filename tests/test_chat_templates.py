"""Loss masks under the chat templates the four model families publish (tests/templates/,
sources in its SOURCES.md) and under templates that are not prefix-stable: Qwen3's thinking
block appears only on assistant turns after the last user message, and a small template
written here renders every turn differently depending on how many turns follow it. Exactly
the assistant turns' text is learned; tests/templates/learned.json holds, per template and
conversation, the text of each learned turn (UPDATE_GOLDEN=1 rewrites it)."""

import json
import os

import pytest

from launcher.recipe import load_recipe
from tests.conftest import REPO
from tests.trainer_helpers import TINY

pytest.importorskip("transformers")

from trainer.data.chat import assistant_spans, load_tokenizer, tokenize_conversation  # noqa: E402
from trainer.data.parquet import BadRow  # noqa: E402

TEMPLATES = REPO / "tests" / "templates"
QWEN3 = (TEMPLATES / "qwen3_thinking.jinja").read_text()

SORT = {"type": "function", "function": {"name": "sort", "arguments": '{"items": ["b", "a"]}'}}
CONVERSATIONS = {  # name: (messages, template options)
    "single": ([{"role": "user", "content": "Sort: b a"}, {"role": "assistant", "content": "a b"}], {}),
    "multi": ([{"role": "user", "content": "Sort: b a"}, {"role": "assistant", "content": "a b"},
               {"role": "user", "content": "Again: d c"}, {"role": "assistant", "content": "c d"}], {}),
    "system": ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sort: b a"},
                {"role": "assistant", "content": "a b"}, {"role": "user", "content": "Again: d c"},
                {"role": "assistant", "content": "c d"}], {}),
    # a tool call's content: None as DeepSeek-V3's template needs (it tells a call by `content is
    # none`), "" as Qwen3's needs (it searches the content for "</think>")
    "tools": ([{"role": "user", "content": "Sort b a"}, {"role": "assistant", "content": None, "tool_calls": [SORT]},
               {"role": "tool", "content": '["a", "b"]'}, {"role": "assistant", "content": "a b"}], {}),
    "tools_empty_content": ([{"role": "user", "content": "Sort b a"},
                             {"role": "assistant", "content": "", "tool_calls": [SORT]},
                             {"role": "tool", "content": '["a", "b"]'}, {"role": "assistant", "content": "a b"}], {}),
    "reasoning": ([{"role": "user", "content": "Sort: b a"},
                   {"role": "assistant", "content": "a b", "reasoning_content": "Two letters."},
                   {"role": "user", "content": "Again: d c"},
                   {"role": "assistant", "content": "c d", "reasoning_content": "Same again."}], {}),
    "no_thinking": ([{"role": "user", "content": "Sort: b a"}, {"role": "assistant", "content": "a b"},
                     {"role": "user", "content": "Again: d c"}, {"role": "assistant", "content": "c d"}],
                    {"enable_thinking": False}),
}
# template file: (bos and eos tokens of the model's tokenizer_config.json, conversations it renders)
PUBLISHED = {
    "mixtral_8x7b_instruct": ("<s>", "</s>", ["single", "multi", "system"]),
    "qwen1_5_chat": (None, "<|im_end|>", ["single", "multi", "system"]),
    "qwen2_chatml": (None, "<|im_end|>", ["single", "multi", "system"]),
    "qwen3_hybrid": (None, "<|im_end|>", ["single", "multi", "system", "tools_empty_content", "reasoning",
                                        "no_thinking"]),
    "deepseek_v3": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", ["single", "multi", "system"]),
}


@pytest.fixture()
def tokenizer():
    return load_tokenizer(load_recipe(TINY).model.tokenizer_path)


def published_tokenizer(name: str):
    """The tiny tokenizer dressed as the model's: its template and its bos/eos tokens."""
    bos, eos, _ = PUBLISHED[name]
    tokenizer = load_tokenizer(load_recipe(TINY).model.tokenizer_path)
    tokenizer.chat_template = (TEMPLATES / f"{name}.jinja").read_text()
    tokenizer.bos_token, tokenizer.eos_token = bos, eos
    return tokenizer


def test_published_templates_learn_exactly_the_assistant_turns():
    """Each learned turn's text is the golden one, and the tokens that get loss decode to
    exactly those texts: nothing of system, user or tool turns or of a generation prompt."""
    golden_file = TEMPLATES / "learned.json"
    found = {}
    for name, (_, _, conversations) in PUBLISHED.items():
        tokenizer = published_tokenizer(name)
        for conversation in conversations:
            messages, options = CONVERSATIONS[conversation]
            text, spans = assistant_spans(tokenizer, messages, "test", options)
            turns = [text[a:b] for a, b in spans]
            ids, mask = tokenize_conversation(tokenizer, messages, "test", options)
            assert tokenizer.decode([t for t, m in zip(ids, mask) if m]) == "".join(turns), (name, conversation)
            found[f"{name} {conversation}"] = turns
    if os.environ.get("UPDATE_GOLDEN"):
        golden_file.write_text(json.dumps(found, indent=1, ensure_ascii=False) + "\n")
    assert found == json.loads(golden_file.read_text())


def test_a_row_the_template_refuses_is_a_bad_row_with_the_templates_reason():
    tokenizer = published_tokenizer("mixtral_8x7b_instruct")  # no tool role
    with pytest.raises(BadRow, match=r"^data.parquet: row 4: the chat template refuses the conversation: "
                                     r".*roles must alternate"):
        tokenize_conversation(tokenizer, CONVERSATIONS["tools_empty_content"][0], "data.parquet: row 4")


def test_deepseek_v3_tool_calls_are_refused_with_the_reason():
    """DeepSeek-V3's template renders a tool call only for `content is none`, and transformers
    drops None values before rendering: such rows cannot be rendered; the user is told why."""
    tokenizer = published_tokenizer("deepseek_v3")
    with pytest.raises(BadRow, match=r"^data.parquet: row 2: the chat template refuses .* without a 'content' key"):
        tokenize_conversation(tokenizer, CONVERSATIONS["tools"][0], "data.parquet: row 2")


def learned(tokenizer, template, messages, **kwargs):
    tokenizer.chat_template = template
    text, spans = assistant_spans(tokenizer, messages, "test", kwargs)
    return [text[a:b] for a, b in spans]


def test_qwen3_multi_turn_learns_each_assistant_turn_as_the_whole_conversation_renders_it(tokenizer):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Sort: b a"}, {"role": "assistant", "content": "a b"},
                {"role": "user", "content": "Again: d c"},
                {"role": "assistant", "content": "c d", "reasoning_content": "Two letters."}]
    # turn 2 precedes the last user message: no thinking block; the last turn continues the
    # generation prompt, which ends in "<think>\n": the reasoning onwards is learned
    assert learned(tokenizer, QWEN3, messages) == [
        "a b<|im_end|>\n", "Two letters.\n</think>\n\nc d<|im_end|>\n"]


def test_qwen3_tool_calls_are_learned_and_tool_replies_are_not(tokenizer):
    call = {"type": "function", "function": {"name": "sort", "arguments": {"items": ["b", "a"]}}}
    messages = [{"role": "user", "content": "Sort b a"},
                {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "content": "[\"a\", \"b\"]"},
                {"role": "assistant", "content": "a b"}]
    turns = learned(tokenizer, QWEN3, messages)
    # the call is not the last turn and has no reasoning: no thinking block (the generation
    # prompt, which opens one, is not how the conversation renders it)
    assert turns[0] == '<tool_call>\n{"name": "sort", "arguments": {"items": ["b", "a"]}}\n</tool_call><|im_end|>\n'
    assert turns[1] == "\n</think>\n\na b<|im_end|>\n"
    assert all('["a", "b"]' not in t for t in turns)  # the tool's reply


def test_template_options_reach_every_rendering(tokenizer):
    template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% if not thinking %}[no-think]{% endif %}{% endif %}")
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "[no-think]yo"}]
    assert learned(tokenizer, template, messages, thinking=True) == ["[no-think]yo</assistant>"]
    # with the option the prompt already holds "[no-think]": it is not learned
    assert learned(tokenizer, template, messages, thinking=False) == ["yo</assistant>"]


def test_a_template_that_renders_turns_by_their_distance_from_the_end(tokenizer):
    """Nothing of the conversation cut before a turn renders as the whole does."""
    template = ("{% for m in messages %}[{{ m.role }} {{ messages|length - loop.index0 }}]{{ m.content }}"
                "{% if m.role == 'assistant' %}<end>{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}[assistant 0]{% endif %}")
    messages = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "uno"},
                {"role": "user", "content": "two"}, {"role": "assistant", "content": "dos"}]
    assert learned(tokenizer, template, messages) == ["uno<end>", "dos<end>"]


def test_tokens_of_the_learned_text_get_loss(tokenizer):
    tokenizer.chat_template = QWEN3
    messages = [{"role": "user", "content": "Sort: b a"}, {"role": "assistant", "content": "a b"},
                {"role": "user", "content": "Again"}, {"role": "assistant", "content": "c d"}]
    ids, mask = tokenize_conversation(tokenizer, messages, "test")
    text = tokenizer.decode([t for t, m in zip(ids, mask) if m])
    assert "a b<|im_end|>" in text and "c d<|im_end|>" in text
    assert "Sort" not in text and "Again" not in text and "assistant" not in text


def test_a_turn_whose_span_cannot_be_found_names_the_row_and_turn(tokenizer):
    tokenizer.chat_template = ("{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}{% endif %}"
                               "{% endfor %}")  # drops the assistant's turns
    with pytest.raises(BadRow, match=r"^data.parquet: row 3: turn 1: .*assistant"):
        tokenize_conversation(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                              "data.parquet: row 3")


def test_training_on_multi_turn_rows_under_the_qwen3_template(tmp_path):
    """Every two-turn row once failed ("does not render turn 1 as a prefix"); now all train, and
    the trainer learns as many tokens over an epoch as `launcher data check` counts."""
    import json
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.conftest import RECIPES, run_launcher
    from tests.trainer_helpers import losses, train, write_recipe

    model = tmp_path / "model"
    shutil.copytree(RECIPES / "models" / "tiny_moe", model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = QWEN3
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    rows = [[{"role": "user", "content": f"Count: {w}"}, {"role": "assistant", "content": "1 words"},
             {"role": "user", "content": f"Again: {w} {w}"}, {"role": "assistant", "content": "2 words"}]
            for w in ("apple", "river", "stone", "cloud") * 4]
    pq.write_table(pa.table({"messages": rows}), tmp_path / "chat.parquet")
    overrides = [f"model.path={model}", f"data.train_files={tmp_path / 'chat.parquet'}", "data.val_files=[]",
                 "data.multiturn.enable=true", "data.skip_bad_rows=false", "megatron.expert_model_parallel_size=1",
                 "data.global_batch_size=1", "data.micro_batch_size=1", "data.max_length=512", "data.shuffle=false",
                 # a row per sample: rows packed on into the next epoch would learn more than one epoch's tokens
                 "data.pack_sequences=false"]
    code, out, err = run_launcher("data", "check", str(write_recipe(tmp_path / "check", *overrides)), "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["usable_rows"] == 16 and report["turns"] == 64 and report["packed_rows"] == 16
    # one epoch: a step per row
    _, log, metrics = train(tmp_path / "run", *overrides, f"trainer.total_training_steps={report['packed_rows']}",
                            nproc=1)
    assert len(losses(metrics)) == report["packed_rows"] and "bad_rows_skipped" not in log
    assert sum(m["response_tokens"] for m in metrics if "loss" in m) == report["learned_tokens"]
