"""SFT data: chat templates and loss masks, bad rows, truncation, shuffling (pyarrow, the tiny tokenizer)."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from launcher.recipe import load_recipe
from tests.trainer_helpers import TINY

pytest.importorskip("transformers")

from trainer.data.batches import SFTData  # noqa: E402
from trainer.data.chat import load_tokenizer, tokenize_conversation  # noqa: E402
from trainer.data.parquet import BadRow, DataError  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(load_recipe(TINY).model.tokenizer_path)


def data(tmp_path, rows, *overrides, name="d.parquet"):
    path = tmp_path / name
    columns = sorted({k for r in rows for k in r})
    pq.write_table(pa.table({c: [r.get(c) for r in rows] for c in columns}), path, row_group_size=2)
    return path, load_recipe(TINY, [f"data.train_files={path}", *overrides]).data


def test_only_assistant_tokens_get_loss(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sort: b a"},
                {"role": "assistant", "content": "a b"}, {"role": "user", "content": "Again"},
                {"role": "assistant", "content": "a b"}]
    ids, mask = tokenize_conversation(tokenizer, messages, "test")
    learned = tokenizer.decode([t for t, m in zip(ids, mask) if m])
    assert learned == "a b<|eos|>\na b<|eos|>\n"
    prompt = tokenizer.decode([t for t, m in zip(ids, mask) if not m])
    assert "Sort: b a" in prompt and "Be brief." in prompt and "<|assistant|>" in prompt


def test_packed_rows_keep_samples_apart(tmp_path, tokenizer):
    path, cfg = data(tmp_path, [{"prompt": f"Count: {w}", "response": "1 words"} for w in ("apple", "river", "stone")],
                     "data.shuffle=false")
    (row,) = list(SFTData([str(path)], cfg, tokenizer, 0).rows(0))
    samples = sorted(set(row.sample.tolist()))
    assert samples == [-1, 0, 1, 2]  # the padding and three samples
    last = max(i for i, s in enumerate(row.sample) if s == 0)
    assert row.loss_mask[last] == 0  # no label crosses into the next sample


@pytest.mark.parametrize("row,message", [
    ({"prompt": "hi", "response": None}, "'response' must be a string, found NoneType"),
    ({"prompt": "hi", "response": "   "}, "no assistant response to learn from"),
])
def test_bad_rows_name_file_and_row(tmp_path, tokenizer, row, message):
    good = {"prompt": "Count: apple", "response": "1 words"}
    path, cfg = data(tmp_path, [good, good, row])
    with pytest.raises(BadRow) as info:
        list(SFTData([str(path)], cfg, tokenizer, 0).rows(0))
    assert str(info.value).startswith(f"{path}: row 2: ") and message in str(info.value)
    skipping = SFTData([str(path)], load_recipe(TINY, [f"data.train_files={path}", "data.skip_bad_rows=true"]).data,
                       tokenizer, 0)
    list(skipping.rows(0))
    assert skipping.counts["bad_rows_skipped"] == 1


def test_tokenising_processes_give_the_same_rows_in_the_same_order(tokenizer):
    """data.num_workers processes tokenise in windows, started by the data worker; the rows
    (their order, tokens, masks and sample ids) are those of one process, over epochs too (the
    bundled set is ~700 samples)."""
    import signal

    import numpy as np

    from launcher.errors import UserError

    from trainer.data.batches import prefetch

    def first_rows(workers, count=16):
        cfg = load_recipe(TINY, [f"data.num_workers={workers}", "data.max_length=2048"]).data
        reader = SFTData(cfg.train_files, cfg, tokenizer, 0)
        stream = prefetch(reader.slot_stream([0, 1], 2, {0: (0, 0), 1: (0, 0)}))  # as the trainer reads it
        return [next(stream)[1:] for _ in range(count)]

    alone = first_rows(0)
    previous = signal.signal(signal.SIGTERM, lambda *_: None)  # the trainer's stop flag, inherited by workers
    try:
        pooled = first_rows(3)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert [at for at, _ in alone] == [at for at, _ in pooled] and alone[-1][0][0] >= 1
    for (_, a), (_, b) in zip(alone, pooled):
        for name in ("tokens", "labels", "loss_mask", "sample"):
            assert np.array_equal(getattr(a, name), getattr(b, name))
    with pytest.raises(UserError, match="data.num_workers: -1 must be 0"):
        load_recipe(TINY, ["data.num_workers=-1"])


def test_each_rank_reads_only_its_row_slots_and_the_batches_do_not_depend_on_the_layout(tokenizer, monkeypatch):
    """A global batch of 4 rows is 4 slots, each packing every 4th sample of the shuffled epoch:
    two data-parallel ranks holding slots {0, 2} and {1, 3} get the rows one rank holding all four
    gets, each tokenising only its half of the samples; and a stream resumed from the slots'
    positions goes on with the same rows, across an epoch boundary. Rows run on across epochs:
    none is left half empty where an epoch ends."""
    from trainer.data import batches

    tokenised = []
    tokenise = batches._tokenise_row
    monkeypatch.setattr(batches, "_tokenise_row", lambda item, *rest: tokenised.append(item) or tokenise(item, *rest))
    cfg = load_recipe(TINY, ["data.num_workers=0"]).data

    def rows(slots, count, positions=None):
        stream = SFTData(cfg.train_files, cfg, tokenizer, 0).slot_stream(slots, 4, positions or dict.fromkeys(slots, (0, 0)))
        found: dict = {}
        for _ in range(count * len(slots)):
            slot, at, row = next(stream)
            found.setdefault(slot, []).append((at, row.tokens.tobytes(), row.real_tokens()))
        return found

    whole = rows([0, 1, 2, 3], 60)
    read_by_one = len(tokenised)
    tokenised.clear()
    evens = rows([0, 2], 60)
    assert len(tokenised) < 0.6 * read_by_one
    odds = rows([1, 3], 60)
    assert whole == {**evens, **odds}
    assert whole[0][-1][0][0] == 1  # into the second epoch
    longest = max(len(sample[0]) for sample in SFTData(cfg.train_files, cfg, tokenizer, 0).samples(0))
    assert all(filled > cfg.max_length - longest for slot in whole for _, _, filled in whole[slot])
    middle = {slot: whole[slot][29][0] for slot in whole}
    assert rows([0, 1, 2, 3], 30, middle) == {slot: whole[slot][30:] for slot in whole}


def test_fewer_usable_rows_than_a_global_batch_is_refused_not_waited_on(tmp_path, tokenizer):
    path, cfg = data(tmp_path, [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(3)],
                     "data.num_workers=0")
    stream = SFTData([str(path)], cfg, tokenizer, 0).slot_stream([2, 3], 4, {2: (0, 0), 3: (0, 0)})
    with pytest.raises(DataError, match="fewer usable rows than the 4 rows of a global batch"):
        next(stream)


def test_unknown_role_and_missing_column(tmp_path, tokenizer):
    path, cfg = data(tmp_path, [{"messages": [{"role": "wizard", "content": "x"}]}], "data.multiturn.enable=true")
    with pytest.raises(BadRow, match="row 0: message 0 has unknown role 'wizard'"):
        list(SFTData([str(path)], cfg, tokenizer, 0).rows(0))
    path, cfg = data(tmp_path, [{"question": "x"}], name="other.parquet")
    with pytest.raises(DataError, match="column 'prompt' is missing"):
        SFTData([str(path)], cfg, tokenizer, 0)


def test_truncation_policies(tmp_path, tokenizer):
    long = {"prompt": "Reverse: " + "apple " * 60, "response": "done"}
    path, cfg = data(tmp_path, [long], "data.max_length=64")
    with pytest.raises(BadRow, match="exceed data.max_length=64"):
        list(SFTData([str(path)], cfg, tokenizer, 0).rows(0))
    left = SFTData([str(path)], load_recipe(TINY, [f"data.train_files={path}", "data.max_length=64",
                                                   "data.truncation=left"]).data, tokenizer, 0)
    (row,) = list(left.rows(0))
    assert row.loss_mask.sum() > 0 and left.counts["samples_truncated"] == 1


def test_shuffle_is_fixed_by_seed_and_epoch(tmp_path, tokenizer):
    rows = [{"prompt": f"Count: {'apple ' * (i + 1)}", "response": f"{i + 1} words"} for i in range(10)]
    path, cfg = data(tmp_path, rows, "data.pack_sequences=false")
    order = lambda seed, epoch: [r.tokens.tolist() for r in SFTData([str(path)], cfg, tokenizer, seed).rows(epoch)]  # noqa: E731
    assert order(1, 0) == order(1, 0)
    assert order(1, 0) != order(1, 1) and order(1, 0) != order(2, 0)
    assert sorted(map(str, order(1, 0))) == sorted(map(str, order(1, 1)))


def test_tokens_per_second_count_every_sample_token_and_no_padding():
    """A row that packing filled exactly has no padding: all of its tokens are real (the
    throughput figures count them; the last sample of a full row once went uncounted)."""
    import numpy as np

    from trainer.data.batches import Row

    full = Row(np.arange(6), np.arange(6), np.ones(6, np.float32), np.array([0, 0, 1, 1, 1, 2], np.int32))
    padded = Row(np.arange(6), np.arange(6), np.ones(6, np.float32), np.array([0, 0, 1, -1, -1, -1], np.int32))
    assert full.real_tokens() == 6 and padded.real_tokens() == 3


def test_sample_boundaries_describe_the_same_attention_as_the_dense_mask(tmp_path, tokenizer):
    """The int32 boundaries flash attention takes and the dense mask SDPA takes keep the same
    pairs of tokens apart, over several packed rows with padding (and a row holding one sample
    that ends exactly at its end, whose successor must still start a new sample)."""
    import numpy as np
    import torch

    from trainer.data.batches import Row, collate
    from trainer.model.attention import boundaries_to_mask

    rows_data = [{"prompt": "Say " + "a b " * k, "response": "c " * (k + 1)} for k in range(7)]
    path, cfg = data(tmp_path, rows_data, "data.max_length=48", "data.shuffle=false")
    rows = list(SFTData([str(path)], cfg, tokenizer, 0).rows(0))
    assert len(rows) >= 3 and any(len(set(r.sample.tolist())) > 2 for r in rows)
    full = Row(np.arange(48), np.arange(48), np.ones(48, np.float32), np.zeros(48, np.int32))
    rows = rows[:3] + [full, full]
    cu = collate(rows, "cpu", "boundaries")["attention_mask"]
    assert cu.dtype == torch.int32 and int(cu[-1]) == 48 * len(rows) and 48 * 4 in cu.tolist()
    assert torch.equal(boundaries_to_mask(cu, len(rows), 48), same_sample_causal_mask(rows))


def same_sample_causal_mask(rows) -> "torch.Tensor":
    """[b, 1, L, L], True = masked out: a token sees the earlier tokens of its own sample."""
    import numpy as np
    import torch

    sample = torch.from_numpy(np.stack([r.sample for r in rows]))
    causal = torch.ones(sample.shape[1], sample.shape[1], dtype=torch.bool).tril()
    return ~(causal & (sample[:, :, None] == sample[:, None, :]))[:, None]


@pytest.mark.parametrize("cp", [2, 4])
def test_context_parallel_pieces_attend_like_the_dense_mask(tmp_path, tokenizer, cp):
    """Each CP rank's attention pieces (trainer.model.cp_attention: its two chunks of each row,
    cut at sample starts, against the keys from each sample's start) give that rank's rows of
    SDPA under the dense same-sample causal mask, over packed rows with padding, one row of a
    single sample, grouped-query heads, forward and backward."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from trainer.data.batches import Row, collate
    from trainer.model import cp_attention

    rows_data = [{"prompt": "Say " + "a b " * k, "response": "c " * (k + 1)} for k in range(7)]
    path, cfg = data(tmp_path, rows_data, "data.max_length=48", "data.shuffle=false")
    rows = list(SFTData([str(path)], cfg, tokenizer, 0).rows(0))[:3]
    assert any(len(set(r.sample.tolist())) > 2 for r in rows)
    rows.append(Row(np.arange(48), np.arange(48), np.ones(48, np.float32), np.zeros(48, np.int32)))
    b, s, heads, kv_heads, dim = len(rows), 48, 4, 2, 8
    boundaries = collate(rows, "cpu", "boundaries")["attention_mask"]
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(s, b, heads, dim, generator=generator, requires_grad=True)
    k, v = (torch.randn(s, b, kv_heads, dim, generator=generator, requires_grad=True) for _ in range(2))
    grad = torch.randn(s, b, heads * dim, generator=generator)
    dense = F.scaled_dot_product_attention(*(t.permute(1, 2, 0, 3) for t in (q, k, v)), enable_gqa=True,
                                           attn_mask=~same_sample_causal_mask(rows))
    dense = dense.permute(2, 0, 1, 3).reshape(s, b, heads * dim)
    dense.backward(grad)
    expected = [t.grad.clone() for t in (q, k, v)]
    chunk, found = s // (2 * cp), [torch.zeros_like(t) for t in (q, k, v)]
    for rank in range(cp):
        mine = torch.from_numpy(cp_attention.rank_positions(s, cp, rank))
        spans = cp_attention.spans_on_device(cp_attention.rank_spans(boundaries.host, b, s, cp, rank), "cpu")
        assert spans.max_query <= chunk and int(spans.key_cu[-1]) < s * b * (1 + 1 / cp)
        for t in (q, k, v):
            t.grad = None
        # what the all-gather of the ranks' keys and values gives, built here from the whole rows
        keys_values = cp_attention.in_gathered_order(k, v, cp)
        out = cp_attention.attend(q[mine], keys_values, dim, spans, dim ** -0.5)
        assert torch.allclose(out, dense[mine].detach(), atol=1e-5), f"rank {rank} of {cp}"
        out.backward(grad[mine])
        for total, t in zip(found, (q, k, v)):
            total += t.grad  # each rank's share of the gradients; over the ranks, the whole
    for total, want in zip(found, expected):
        assert torch.allclose(total, want, atol=1e-5)


def test_packed_sequences_for_transformer_engine(tmp_path, tokenizer):
    """transformer-engine's THD micro-batch: the rows laid end to end as one sequence, with the
    sample boundaries flash attention gets; under context parallelism (samples aligned to
    2 x CP) every sample's span is a multiple of the alignment and holds all of its tokens,
    and packing keeps every sample."""
    import numpy as np

    from trainer.data.batches import collate, sample_boundaries, thd_boundaries

    rows_data = [{"prompt": "Say " + "a b " * k, "response": "c " * (k + 1)} for k in range(9)]
    path, cfg = data(tmp_path, rows_data, "data.max_length=64", "data.shuffle=false")
    plain = list(SFTData([str(path)], cfg, tokenizer, 0).rows(0))
    batch = collate(plain[:2], "cpu", "thd")
    params = batch["packed_seq_params"]
    assert batch["tokens"].shape == (1, 128) and batch["attention_mask"] is None
    assert batch["tokens"][0, 64:].tolist() == plain[1].tokens.tolist()
    assert params.qkv_format == "thd" and params.cu_seqlens_q_padded is None
    assert params.cu_seqlens_q.tolist() == sample_boundaries([r.sample for r in plain[:2]]).tolist()
    # the response tokens the output layer picks out, counted on the host, in both forms
    for form in ("thd", "boundaries"):
        mask = collate(plain[:2], "cpu", form)["loss_mask"]
        assert mask.response_tokens == int((mask > 0).sum()) > 0

    aligned = list(SFTData([str(path)], cfg, tokenizer, 0, align=4).rows(0))
    lengths = lambda rows: sorted(int((r.sample == k).sum()) for r in rows for k in set(r.sample.tolist()) - {-1})  # noqa: E731
    assert lengths(aligned) == lengths(plain)  # every sample, whole
    for row in aligned:
        starts = np.flatnonzero(np.diff(row.sample, prepend=-2) != 0)
        assert all(s % 4 == 0 for s in starts if row.sample[s] >= 0)
    real, padded = thd_boundaries([r.sample for r in aligned[:2]], 4)
    assert padded[-1] == 128 and all(np.diff(padded) % 4 == 0)
    spans, sizes = np.diff(padded), np.diff(real)
    assert all(sizes <= spans) and sizes.sum() == 128 - (spans - sizes).sum()
    params = collate(aligned[:2], "cpu", "thd", align=4)["packed_seq_params"]
    assert params.cu_seqlens_q_padded.tolist() == padded.tolist()


def test_data_check_reads_json_lines_and_names_bad_rows(tmp_path):
    """`launcher data check` on a JSON Lines file with one bad line and one empty response:
    the counts, the bad rows by line, exit 2 (the job would stop there), the learned text
    marked in the samples; with data.skip_bad_rows the same data passes."""
    import json

    from tests.conftest import run_launcher
    from tests.trainer_helpers import write_recipe

    lines = [json.dumps({"prompt": f"Count: {w}", "response": "1 words"}) for w in ("apple", "river", "stone")]
    lines.insert(1, "{not json")
    lines.append(json.dumps({"prompt": "Count: x", "response": "  "}))
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    recipe = write_recipe(tmp_path / "run", f"data.train_files={tmp_path / 'd.jsonl'}", "data.val_files=[]")
    code, out, err = run_launcher("data", "check", str(recipe))
    assert code == 2, err
    assert "rows        5 read, 3 usable, 2 bad" in out
    assert f"bad row     {tmp_path / 'd.jsonl'}: row 1: not a JSON object" in out
    assert f"{tmp_path / 'd.jsonl'}: row 4: no assistant response to learn from" in out
    assert "«1 words<|eos|>" in out and "the job would stop at the first bad row" in out
    code, out, _ = run_launcher("data", "check", str(recipe), "data.skip_bad_rows=true", "--json")
    report = json.loads(out)
    assert code == 0 and report["usable_rows"] == 3 and report["learned_tokens"] > 0


def test_data_check_on_a_cluster_reads_the_files_behind_its_container_mounts(tmp_path):
    """The recipe names the data as the job's container sees it (/shared/...); with --cluster the
    check reads the host side of the profile's mount, and says how many steps an epoch gives."""
    import json
    import shutil

    import yaml

    from tests.conftest import REPO, run_launcher
    from tests.trainer_helpers import write_recipe

    host = tmp_path / "host-shared"
    (host / "sft").mkdir(parents=True)
    shutil.copy(REPO / "recipes" / "data" / "tiny_sft.parquet", host / "sft" / "train.parquet")
    profile = yaml.safe_load((REPO / "clusters" / "slurm.yaml").read_text())
    profile["container"]["mounts"] = [f"{tmp_path}/elsewhere:/shared/other", f"{host}:/shared"]
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(profile))
    recipe = write_recipe(tmp_path / "run", "data.train_files=/shared/sft/train.parquet", "data.val_files=[]",
                          "data.global_batch_size=2")
    code, _, err = run_launcher("data", "check", str(recipe))
    assert code == 2 and "/shared/sft/train.parquet: no such data file" in err
    code, out, err = run_launcher("data", "check", str(recipe), "--cluster", str(tmp_path / "cluster.yaml"), "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["files"] == [f"{host}/sft/train.parquet"] and report["usable_rows"] > 0
    # 1,200 rows in the file, the first 1,000 read: an epoch scales their packed rows up
    assert report["rows_in_files"] == 1200 and report["rows_read"] == 1000
    assert report["steps_per_epoch"] == round(report["packed_rows"] * 1.2 / 2)


def test_prefetch_runs_in_a_worker_process_and_raises_its_errors():
    """Tokenising runs in a forked worker (off the trainer's interpreter lock): items arrive in
    order, a bad row raised there arrives here with its text, and the worker ends with the
    generator."""
    import os

    from trainer.data.batches import prefetch

    def numbers():
        for i in range(5):
            yield i, os.getpid()
        raise BadRow("data.parquet: row 7: no assistant turn")

    stream = prefetch(numbers())
    got = [next(stream) for _ in range(5)]
    assert [i for i, _ in got] == list(range(5))
    assert {pid for _, pid in got} != {os.getpid()}  # produced in another process
    with pytest.raises(BadRow, match="row 7: no assistant turn"):
        next(stream)

    endless = prefetch(iter(lambda: os.getpid(), None))
    worker = next(endless)
    endless.close()
    with pytest.raises(ProcessLookupError):
        os.kill(worker, 0)


STUCK_IN_FORK = """
import os, sys, time
from trainer.data import batches
batches.WORKER_START_S = 2.0
def first_child_hangs():  # as a trainer rank's child once did, inside os.fork, before its own code
    if not os.path.exists(sys.argv[1]):
        open(sys.argv[1], "w").close()
        time.sleep(3600)
os.register_at_fork(after_in_child=first_child_hangs)
print(list(batches.prefetch(iter(range(5)))))
"""


def test_prefetch_forks_again_when_its_worker_hangs_before_starting(tmp_path):
    """A data worker that never starts (stuck in the fork) is killed and forked again: every
    item arrives once, in order, instead of the rank waiting forever."""
    import subprocess
    import sys

    from tests.trainer_helpers import REPO

    done = subprocess.run([sys.executable, "-c", STUCK_IN_FORK, str(tmp_path / "forked")], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[0, 1, 2, 3, 4]"
    assert (tmp_path / "forked").exists()  # the first worker did hang
