"""Packed rows of max_length tokens, and the micro-batches each rank trains on.

Samples are packed greedily, in order, into rows of `data.max_length` tokens (or one
sample per row without packing). Each token carries the id of its sample, so attention
stays inside a sample; the label of a token is the next token of the same sample, and
only labels that are assistant tokens count towards the loss.

A global batch of `global_batch_size` rows is as many row slots: slot s packs the samples at
places s, s + global_batch_size, ... of each epoch's shuffled order (the seed's), and each
data-parallel rank reads and tokenises only the samples of the slots it trains on
(`SFTData.slot_stream`). The batches are the same under any layout; each slot's position
(the epoch and place of its next sample) is what a checkpoint stores. `rows` packs a whole file in order (the
validation set, the launcher's data check).
"""

from __future__ import annotations

import os
from collections import Counter, deque
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from trainer.data.chat import tokenize_conversation
from trainer.data.parquet import BadRow, DataError, row_groups, shuffled_rows, to_messages


@dataclass
class Row:
    tokens: np.ndarray  # [L] int64
    labels: np.ndarray  # [L] int64
    loss_mask: np.ndarray  # [L] float32: 1 where the label is an assistant token
    sample: np.ndarray  # [L] int32: which sample each token belongs to (padding: -1)

    def real_tokens(self) -> int:
        return int((self.sample >= 0).sum())


class SFTData:
    def __init__(self, files: list[str], data, tokenizer, seed: int, align: int = 1):
        self.data = data
        self.files = files
        # Packed samples start at multiples of `align`: transformer-engine's context-parallel
        # attention over packed samples splits each sample into 2 x CP equal chunks.
        self.align = align
        self.tokenizer = tokenizer
        self.seed = seed
        self.columns = ([data.multiturn.messages_key] if data.multiturn.enable
                        else [data.prompt_key, data.response_key])
        self.groups = row_groups(files, self.columns)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.counts: Counter = Counter()  # skipped bad rows, truncated samples

    def samples(self, epoch: int) -> Iterator[tuple[list[int], list[int]]]:
        rows = shuffled_rows(self.groups, self.columns, self.seed, epoch, self.data.shuffle)
        for _, sample in self._usable(tokenised_rows(rows, self.tokenizer, self.data)):
            yield sample

    def _usable(self, tokenised):
        """(k, (ids, mask)) for the k-th of the tokenised rows, fitted to max_length, when it is
        usable; a bad row is raised, or skipped and counted with data.skip_bad_rows."""
        for k, (where, result) in enumerate(tokenised):
            try:
                if isinstance(result, BadRow):
                    raise result
                sample = self.fit(*result, where)
            except BadRow:
                if not self.data.skip_bad_rows:
                    raise
                self.counts["bad_rows_skipped"] += 1
                continue
            yield k, sample

    def fit(self, ids: list[int], mask: list[int], where: str) -> tuple[list[int], list[int]]:
        limit = self.data.max_length
        if len(ids) > limit:
            policy = self.data.truncation
            if policy == "error":
                raise BadRow(f"{where}: {len(ids)} tokens exceed data.max_length={limit}; raise it or set "
                             "data.truncation to left or right")
            ids, mask = (ids[-limit:], mask[-limit:]) if policy == "left" else (ids[:limit], mask[:limit])
            self.counts["samples_truncated"] += 1
            if sum(mask[1:]) == 0:
                raise BadRow(f"{where}: no response tokens are left after truncating to {limit}")
        return ids, mask

    def rows(self, epoch: int) -> Iterator[Row]:
        for group in packed_groups(self.samples(epoch), self.data.max_length, self.data.pack_sequences, self.align):
            yield self.make_row(group)

    def make_row(self, samples) -> Row:
        limit = self.data.max_length
        tokens = np.full(limit, self.pad_id, dtype=np.int64)
        labels = np.full(limit, self.pad_id, dtype=np.int64)
        loss_mask = np.zeros(limit, dtype=np.float32)
        sample = np.full(limit, -1, dtype=np.int32)
        at = 0
        for k, (ids, mask) in enumerate(samples):
            n, at = len(ids), _round_up(at, self.align)
            tokens[at:at + n] = ids
            labels[at:at + n - 1] = ids[1:]
            loss_mask[at:at + n - 1] = mask[1:]
            sample[at:at + n] = k
            at += n
        return Row(tokens, labels, loss_mask, sample)

    def count_rows(self, every: int = 1) -> int:
        """Rows in one epoch (epoch 0's packing, `every` slots); sets the step count when the
        recipe gives none."""
        slots = range(every)
        rows = self.slot_stream(slots, every, {s: (0, 0) for s in slots}, epochs=1)
        return sum(1 for _ in rows)

    def slot_stream(self, slots, every: int, positions: dict, epochs: int | None = None):
        """(slot, position, row) for the given slots of a global batch of `every` rows, one row
        of each slot in turn, forever (or for `epochs`).

        Slot s packs, on its own, the samples at places s, s + every, s + 2 x every... of each
        epoch's shuffled order, epoch after epoch without a break (a row may end one epoch and
        start the next: a small data set trained for many epochs wastes no half-empty rows). A
        step's rows are then the same however the slots are dealt to data-parallel ranks (any
        layout trains on the same batches, and resumes under another), and each rank tokenises
        only its own slots' samples. A position is the (epoch, place) of the next sample a slot
        packs: `positions` gives each slot's to resume from, and each row comes with the one
        after it."""
        source = self._slot_samples({s: tuple(positions[s]) for s in slots}, every, epochs)
        waiting = {s: deque() for s in slots}  # samples read ahead for a slot that is behind

        def next_sample(slot):
            while not waiting[slot]:
                epoch, place, sample = next(source)
                waiting[place % every].append((epoch, place, sample))
            return waiting[slot].popleft()

        rows = {s: self._packed_slot(s, next_sample) for s in slots}
        active = list(slots)
        while active:
            for s in list(active):
                try:
                    yield (s, *next(rows[s]))
                except StopIteration:  # only with `epochs`: this slot's last epoch is done
                    active.remove(s)

    def _packed_slot(self, slot, next_sample):
        """A slot's (position after the row, row), packed greedily in order like `rows`."""
        group, used = [], 0
        limit, pack, align = self.data.max_length, self.data.pack_sequences, self.align
        while True:
            try:
                epoch, place, sample = next_sample(slot)
            except StopIteration:  # the last epoch asked for has ended
                if group:
                    yield (epoch + 1, 0), self.make_row(group)
                return
            if group and (not pack or _round_up(used, align) + len(sample[0]) > limit):
                yield (epoch, place), self.make_row(group)
                group, used = [], 0
            group.append(sample)
            used = _round_up(used, align) + len(sample[0])

    def _slot_samples(self, positions: dict, every: int, epochs: int | None):
        """(epoch, place in the shuffled order, (ids, mask)) of the samples at places that fall
        to the slots of `positions` (place mod `every`), from each slot's position on, tokenised
        in order, epoch after epoch. Samples before a slot's position are never tokenised."""
        epoch = earliest_epoch(positions)
        end = None if epochs is None else epoch + epochs
        while end is None or epoch < end:
            places: list[int] = []

            def chosen(rows):
                for place, item in enumerate(rows):
                    slot = place % every
                    if slot in positions and (epoch, place) >= positions[slot]:
                        places.append(place)
                        yield item

            rows = shuffled_rows(self.groups, self.columns, self.seed, epoch, self.data.shuffle)
            filled = set()
            for k, sample in self._usable(tokenised_rows(chosen(rows), self.tokenizer, self.data)):
                filled.add(places[k] % every)
                yield epoch, places[k], sample
            # slots that read this whole epoch and found nothing would wait forever
            whole = {s for s, at in positions.items() if at <= (epoch, s)}
            if whole - filled:
                what = ("no usable rows to train on (empty, or every row bad and skipped: data.skip_bad_rows)"
                        if not filled else f"fewer usable rows than the {every} rows of a global batch (each row "
                        "packs its own share of the samples); lower data.global_batch_size or add rows")
                raise DataError(f"{', '.join(self.files)}: {what}")
            epoch += 1


def earliest_epoch(positions: dict) -> int:
    """The epoch of the slot that is furthest behind, of slots' (epoch, place) positions."""
    return min(epoch for epoch, _ in positions.values())


def tokenised_rows(rows, tokenizer, data):
    """(where, (ids, mask) or the BadRow) for each (file, number, row), in order. With
    data.num_workers, a pool of forked processes tokenises them, a window of rows at a time
    while the previous window is consumed: rendering chat templates is Python work, about
    0.2-0.4 ms a sample, which one process cannot do for thousands of short samples a step."""
    if data.num_workers == 0:
        yield from (_tokenise_row(row, tokenizer, data) for row in rows)
        return
    import multiprocessing
    from itertools import islice

    window = 64 * data.num_workers
    pool = multiprocessing.get_context("fork").Pool(data.num_workers, initializer=_start_tokeniser,
                                                    initargs=(tokenizer, data, os.getpid()))
    try:
        pending = None
        while True:
            chunk = list(islice(rows, window))
            following = pool.map_async(_tokenise_row, chunk, chunksize=16) if chunk else None
            if pending is not None:
                yield from pending.get()
            if following is None:
                pool.close()  # the workers take their stop sentinels and exit
                pool.join()
                return
            pending = following
    finally:
        pool.terminate()  # a stream abandoned midway (a no-op after join)


_TOKENISER: dict = {}  # in a tokenising process: the tokenizer and data section it started with


def _start_tokeniser(tokenizer, data, parent: int) -> None:
    _TOKENISER.update(tokenizer=tokenizer, data=data)
    _default_signals(parent)


def _tokenise_row(item, tokenizer=None, data=None):
    file, number, row = item
    if tokenizer is None:  # in the pool
        tokenizer, data = _TOKENISER["tokenizer"], _TOKENISER["data"]
    where = f"{file}: row {number}"
    try:
        return where, tokenize_conversation(tokenizer, to_messages(row, file, number, data), where,
                                            data.apply_chat_template_kwargs)
    except BadRow as err:
        return where, err


def packed_groups(samples, limit: int, pack: bool = True, align: int = 1):
    """The (ids, mask) samples that share each row: greedily, in order (one a row without
    packing), each starting at a multiple of `align`."""
    group, used = [], 0
    for ids, mask in samples:
        if group and (not pack or _round_up(used, align) + len(ids) > limit):
            yield group
            group, used = [], 0
        group.append((ids, mask))
        used = _round_up(used, align) + len(ids)
    if group:
        yield group


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


ATTENTION_FORMS = ("boundaries", "thd")


def collate(rows: list[Row], device, form: str = "boundaries", align: int = 1) -> dict:
    """A micro-batch for GPTModel: tokens, positions, labels, loss mask and what keeps attention
    inside each sample, in one of two forms:

    - boundaries: the samples' cumulative lengths over the micro-batch's tokens, row after
      row (int32, [samples + 1]), as the attention mask (trainer.model.attention), with the
      host's copy (`host`: context parallelism cuts it into each rank's pieces);
    - thd: transformer-engine's packed-sequence format. The rows are laid end to end as one
      sequence [1, b x L] and `packed_seq_params` carries the boundaries, so its fused
      attention runs over variable-length samples (megatron-core's PackedSeqParams); `align`
      is the packing's (SFTData), which context parallelism needs.
    """
    import torch  # here: reading and packing the data needs no torch (launcher data check)

    def stacked(name):
        return to_device(np.stack([getattr(r, name) for r in rows]), device)

    tokens, labels, loss_mask = (stacked(n) for n in ("tokens", "labels", "loss_mask"))
    # counted here, so the output layer picks out the response tokens without the host waiting
    # on the GPU (trainer.model.output_loss)
    loss_mask.response_tokens = sum(int(np.count_nonzero(r.loss_mask > 0)) for r in rows)
    length = tokens.shape[1]
    if form == "thd":
        return _thd(tokens, labels, loss_mask, thd_boundaries([r.sample for r in rows], align), device)
    cu_seqlens = sample_boundaries([r.sample for r in rows])
    attention_mask = to_device(cu_seqlens, device)
    attention_mask.host = cu_seqlens
    attention_mask.max_seqlen = int(np.diff(cu_seqlens).max())  # sizes flash attention's grid
    attention_mask.sample_ids = stacked("sample")  # FlexAttention's document mask
    attention_mask.mean_sample = float(np.diff(cu_seqlens).mean())  # (picks it or varlen)
    # RoPE depends on relative positions only, so continuing positions across packed samples
    # gives each sample the same attention as it would get alone.
    position_ids = torch.arange(length, device=tokens.device).expand_as(tokens)
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask,
            "attention_mask": attention_mask, "position_ids": position_ids}


def to_device(array: np.ndarray, device):
    """A host array on `device`, queued behind the GPU's work instead of waiting for it: CUDA
    copies from ordinary (pageable) memory only once the stream has run dry, which stalled the
    host at every micro-batch while the previous step still ran. Pinned memory copies without
    that wait (the caching host allocator keeps the buffer until the copy is done)."""
    import torch

    tensor = torch.from_numpy(array)
    if torch.device(device).type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def _thd(tokens, labels, loss_mask, boundaries, device) -> dict:
    import torch
    from megatron.core.packed_seq_params import PackedSeqParams

    real, padded = boundaries
    on_device = lambda a: to_device(a, device)  # noqa: E731
    longest = int(np.diff(padded).max())
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=on_device(real), cu_seqlens_kv=on_device(real),
                             max_seqlen_q=longest, max_seqlen_kv=longest)
    if not np.array_equal(real, padded):  # samples padded for context parallelism
        params.cu_seqlens_q_padded = params.cu_seqlens_kv_padded = on_device(padded)
    else:  # FlexAttention's document mask for short samples, row by row (trainer.model.attention)
        sample_ids = np.searchsorted(real, np.arange(real[-1]), side="right") - 1
        params.sample_ids = on_device(sample_ids.reshape(tokens.shape))
        params.mean_sample = float(np.diff(real).mean())
    flat = lambda t: t.reshape(1, -1)  # noqa: E731
    # megatron-core restarts rotary positions at each sample from cu_seqlens; these go unused
    positions = torch.arange(tokens.numel(), device=tokens.device)[None]
    flat_mask = flat(loss_mask)
    flat_mask.response_tokens = loss_mask.response_tokens
    return {"tokens": flat(tokens), "labels": flat(labels), "loss_mask": flat_mask, "attention_mask": None,
            "position_ids": positions, "packed_seq_params": params, "rows": tuple(tokens.shape)}


def thd_boundaries(samples: list[np.ndarray], align: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(cu_seqlens, cu_seqlens_padded) of rows laid end to end, transformer-engine's packed
    format: the samples' own lengths, and the spans they occupy. A sample's span takes in the
    padding up to the next multiple of `align` (where SFTData started the next sample); a run
    of padding beyond that is a sample of its own. With `align` 1 the two are equal."""
    real, padded = [0], [0]
    for i, sample in enumerate(samples):
        length = len(sample)
        starts = np.concatenate([[0], np.flatnonzero(np.diff(sample)) + 1]).tolist()
        for start, end in zip(starts, starts[1:] + [length]):
            aligned = start
            if start > 0 and sample[start] < 0:  # padding after a sample: the aligning part is the sample's
                aligned = min(end, _round_up(start, align))
                padded[-1] = i * length + aligned
            if aligned < end:
                real.append(real[-1] + end - aligned)
                padded.append(i * length + end)
    return np.asarray(real, dtype=np.int32), np.asarray(padded, dtype=np.int32)


def sample_boundaries(samples: list[np.ndarray]) -> np.ndarray:
    """Cumulative sample lengths over rows laid end to end: every row starts a sample, and so
    does every change of sample id within a row (padding is a sample of its own)."""
    length = len(samples[0])
    starts = [0]
    for i, sample in enumerate(samples):
        starts.extend(i * length + np.flatnonzero(np.diff(sample)) + 1)
        starts.append((i + 1) * length)
    return np.asarray(starts, dtype=np.int32)


def prefetch(iterator, depth: int = 2):
    """Run `iterator` in a forked process, `depth` items ahead, and yield its items here.

    Tokenising is Python work (a chat template rendered several times per sample): in a thread
    it held the interpreter lock that the training loop needs to launch its kernels, and on
    rows of many short samples the GPU waited on it (bench/README.md). A process, as PyTorch's
    DataLoader workers, takes it off the trainer's interpreter. Forked, not spawned: it inherits
    the iterator as it is, with no imports to repeat, and touches no GPU or process group.
    An exception in the worker is raised here; the worker ends when this process does (or
    when the generator is closed), and never holds the job's output open.

    A forked child can hang before it runs a line of its own: once in about seventy two-rank CPU
    runs, the child of a trainer rank (Python 3.11, dozens of gloo threads) waited forever
    inside os.fork's after-fork handling, on the interpreter's thread-state lock (gdb), and the
    other rank waited on it in the first collective. The worker says it has started; one that
    has not within WORKER_START_S is killed and forked again, from the same untouched iterator."""
    import atexit
    import multiprocessing
    import queue as queue_errors

    worker, items = _start_worker(multiprocessing.get_context("fork"), iterator, depth)
    try:
        while True:
            try:
                kind, item = items.get(timeout=5.0)
            except queue_errors.Empty:
                if not worker.is_alive():
                    raise RuntimeError(f"the data worker died (exit code {worker.exitcode})") from None
                continue
            if kind == "done":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        worker.kill()
        worker.join()
        atexit.unregister(worker.kill)


WORKER_START_S = 30.0  # a forked worker that has not said so by then is stuck in the fork itself
WORKER_FORKS = 3


def _start_worker(context, iterator, depth: int):
    """(the prefetch worker, its queue), started and heard from (prefetch's docstring says why
    it may take more than one fork; each gets a queue of its own)."""
    import atexit
    import pickle
    import queue as queue_errors

    parent = os.getpid()

    def produce(items):
        items.put(("started", None))
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)  # an orphaned worker must not keep a scheduler's output stream open
        os.dup2(devnull, 2)
        _default_signals(parent)
        try:
            for item in iterator:
                items.put(("item", item))
        except BaseException as err:  # surfaces in the training loop, not in a silent process
            try:
                pickle.dumps(err)
            except Exception:  # noqa: BLE001 - an exception that cannot cross: its text can
                err = RuntimeError(f"data worker: {err!r}")
            items.put(("error", err))
        items.put(("done", None))

    for _ in range(WORKER_FORKS):
        # not daemonic, since it starts the tokenising processes (tokenised_rows); killed at exit instead
        items = context.Queue(maxsize=depth)
        worker = context.Process(target=produce, args=(items,), name="moe-data")
        worker.start()
        atexit.register(worker.kill)
        try:
            if items.get(timeout=WORKER_START_S)[0] == "started":
                return worker, items
        except queue_errors.Empty:
            pass
        worker.kill()
        worker.join()
        atexit.unregister(worker.kill)
    raise RuntimeError(f"the data worker did not start in {WORKER_FORKS} forks of {WORKER_START_S:.0f} s each")


def _default_signals(parent: int) -> None:
    """In a forked helper process: SIGTERM and SIGINT end it (the trainer's own SIGTERM handler,
    inherited, would only set its stop flag, and a pool's terminate() then waited forever), and
    it ends with `parent` (a killed rank), wherever it waits."""
    import signal

    from trainer.lifetime import end_with_parent

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    end_with_parent(parent)
