"""Packed rows of max_length tokens, and the micro-batches each rank trains on.

Samples are packed greedily, in order, into rows of `data.max_length` tokens (or one
sample per row without packing). Each token carries the id of its sample, so attention
stays inside a sample; the label of a token is the next token of the same sample, and
only labels that are assistant tokens count towards the loss.

Every rank builds the same row stream from the seed; a step takes `global_batch_size`
rows and each data-parallel rank trains on its own slice of them. The position in the
stream (epoch, rows taken) is what a checkpoint stores.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from trainer.data.chat import tokenize_conversation
from trainer.data.parquet import BadRow, row_groups, shuffled_rows, to_messages


@dataclass
class Row:
    tokens: np.ndarray  # [L] int64
    labels: np.ndarray  # [L] int64
    loss_mask: np.ndarray  # [L] float32: 1 where the label is an assistant token
    sample: np.ndarray  # [L] int32: which sample each token belongs to (padding: -1)

    def real_tokens(self) -> int:
        return int((self.sample >= 0).sum())


class SFTData:
    def __init__(self, files: list[str], data, tokenizer, seed: int):
        self.data = data
        self.tokenizer = tokenizer
        self.seed = seed
        self.columns = ([data.multiturn.messages_key] if data.multiturn.enable
                        else [data.prompt_key, data.response_key])
        self.groups = row_groups(files, self.columns)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.counts: Counter = Counter()  # skipped bad rows, truncated samples

    def samples(self, epoch: int) -> Iterator[tuple[list[int], list[int]]]:
        for file, number, row in shuffled_rows(self.groups, self.columns, self.seed, epoch, self.data.shuffle):
            where = f"{file}: row {number}"
            try:
                ids, mask = tokenize_conversation(self.tokenizer, to_messages(row, file, number, self.data), where)
                yield self.fit(ids, mask, where)
            except BadRow:
                if not self.data.skip_bad_rows:
                    raise
                self.counts["bad_rows_skipped"] += 1

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
        limit = self.data.max_length
        packed: list[tuple[list[int], list[int]]] = []
        used = 0
        for ids, mask in self.samples(epoch):
            if packed and (not self.data.pack_sequences or used + len(ids) > limit):
                yield self.make_row(packed)
                packed, used = [], 0
            packed.append((ids, mask))
            used += len(ids)
        if packed:
            yield self.make_row(packed)

    def make_row(self, samples) -> Row:
        limit = self.data.max_length
        tokens = np.full(limit, self.pad_id, dtype=np.int64)
        labels = np.full(limit, self.pad_id, dtype=np.int64)
        loss_mask = np.zeros(limit, dtype=np.float32)
        sample = np.full(limit, -1, dtype=np.int32)
        at = 0
        for k, (ids, mask) in enumerate(samples):
            n = len(ids)
            tokens[at:at + n] = ids
            labels[at:at + n - 1] = ids[1:]
            loss_mask[at:at + n - 1] = mask[1:]
            sample[at:at + n] = k
            at += n
        return Row(tokens, labels, loss_mask, sample)

    def count_rows(self) -> int:
        """Rows in one epoch (epoch 0's packing); sets the step count when the recipe gives none."""
        return sum(1 for _ in self.rows(0))

    def stream(self, epoch: int = 0, taken: int = 0) -> Iterator[tuple[int, int, Row]]:
        """(epoch, rows taken in that epoch after this one, row) forever, from a saved position."""
        while True:
            for i, row in enumerate(self.rows(epoch)):
                if i >= taken:
                    yield epoch, i + 1, row
            epoch, taken = epoch + 1, 0


def collate(rows: list[Row], device, boundaries: bool = True) -> dict[str, torch.Tensor]:
    """A micro-batch for GPTModel: tokens, positions, labels, loss mask and what keeps attention
    inside each sample.

    With `boundaries` that is the samples' cumulative lengths over the micro-batch's tokens,
    row after row (int32, [samples + 1]; trainer.model.attention); otherwise the dense
    [b, 1, L, L] mask, built on the device (context parallelism slices its rows per rank).
    """
    def stacked(name):
        return torch.from_numpy(np.stack([getattr(r, name) for r in rows])).to(device, non_blocking=True)

    tokens, labels, loss_mask = (stacked(n) for n in ("tokens", "labels", "loss_mask"))
    length = tokens.shape[1]
    if boundaries:
        cu_seqlens = sample_boundaries([r.sample for r in rows])
        attention_mask = torch.from_numpy(cu_seqlens).to(device, non_blocking=True)
        attention_mask.max_seqlen = int(np.diff(cu_seqlens).max())  # sizes flash attention's grid
    else:
        sample = stacked("sample")
        causal = torch.ones(length, length, dtype=torch.bool, device=tokens.device).tril()
        same_sample = sample[:, :, None] == sample[:, None, :]
        attention_mask = ~(causal & same_sample)[:, None]  # True = masked out, megatron's convention
    # RoPE depends on relative positions only, so continuing positions across packed samples
    # gives each sample the same attention as it would get alone.
    position_ids = torch.arange(length, device=tokens.device).expand_as(tokens)
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask,
            "attention_mask": attention_mask, "position_ids": position_ids}


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
    """Run `iterator` in a thread, `depth` items ahead: tokenising the next step's rows
    overlaps with this step's GPU work."""
    import queue
    import threading

    items: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def produce():
        try:
            for item in iterator:
                items.put(item)
        except BaseException as err:  # surfaces in the training loop, not in a silent thread
            items.put(err)
        items.put(done)

    threading.Thread(target=produce, daemon=True).start()
    while True:
        item = items.get()
        if item is done:
            return
        if isinstance(item, BaseException):
            raise item
        yield item
