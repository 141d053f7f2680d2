"""SFT rows from parquet (or JSON Lines), one row group at a time, in a shuffled order fixed by
seed and epoch. A JSON Lines file is read in groups of JSONL_GROUP lines, found by their byte
offsets, so it shuffles and resumes like parquet row groups.

A row becomes a list of chat messages: single-turn rows have a prompt and a response column
(names from the recipe), multi-turn rows a column of {role, content} messages. A row that
cannot be used raises BadRow naming the file and row number; the caller decides whether
that stops the run or is skipped and counted (data.skip_bad_rows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import json

import numpy as np
import pyarrow.parquet as pq

ROLES = ("system", "user", "assistant", "tool")
MESSAGE_KEYS = ("role", "content", "reasoning_content", "tool_calls", "name", "tool_call_id")


class BadRow(ValueError):
    pass


class DataError(ValueError):
    """A problem with a whole file (missing, unreadable, a column missing): always fatal."""


JSONL_GROUP = 1024


@dataclass(frozen=True)
class RowGroup:
    file: str
    index: int
    num_rows: int
    first_row: int  # row number of its first row in the file
    offset: int = -1  # JSON Lines: the byte offset of its first line


def is_jsonl(path: str) -> bool:
    return path.endswith((".jsonl", ".json"))


def row_groups(files: list[str], columns: list[str]) -> list[RowGroup]:
    groups = []
    for path in files:
        if is_jsonl(path):
            groups.extend(_jsonl_groups(path, columns))
            continue
        try:
            parquet = pq.ParquetFile(path)
            meta = parquet.metadata
        except FileNotFoundError:
            raise DataError(f"{path}: no such data file (data.train_files / data.val_files)") from None
        except Exception as err:  # pyarrow raises its own error types for corrupt files
            raise DataError(f"{path}: not a readable parquet file: {err}") from None
        names = set(parquet.schema_arrow.names)  # top-level columns, not nested leaves
        for column in columns:
            if column not in names:
                raise DataError(f"{path}: column '{column}' is missing (it has {', '.join(sorted(names))}); "
                                "set data.prompt_key/response_key or data.multiturn.messages_key")
        start = 0
        for i in range(meta.num_row_groups):
            n = meta.row_group(i).num_rows
            groups.append(RowGroup(path, i, n, start))
            start += n
    return groups


def shuffled_rows(groups: list[RowGroup], columns: list[str], seed: int, epoch: int,
                  shuffle: bool = True, skip: int = 0) -> Iterator[tuple[str, int, dict]]:
    """(file, row number, row) for one epoch; `skip` rows are passed over without being read
    where whole row groups can be skipped."""
    order = np.random.default_rng([seed, epoch]).permutation(len(groups)) if shuffle else range(len(groups))
    for k in order:
        group = groups[k]
        if skip >= group.num_rows:
            skip -= group.num_rows
            continue
        if group.offset >= 0:
            rows = _jsonl_rows(group)
        else:
            rows = pq.ParquetFile(group.file).read_row_group(group.index, columns=columns).to_pylist()
        inner = np.random.default_rng([seed, epoch, int(k)]).permutation(len(rows)) if shuffle else range(len(rows))
        for i in inner:
            if skip:
                skip -= 1
                continue
            yield group.file, group.first_row + int(i), rows[int(i)]


def _jsonl_groups(path: str, columns: list[str]) -> list[RowGroup]:
    groups, offset, count, start, first = [], 0, 0, 0, None
    try:
        with open(path, "rb") as f:
            for line in f:
                if first is None and line.strip():
                    first = line
                if count == JSONL_GROUP:
                    groups.append(RowGroup(path, len(groups), count, start - count, group_offset))
                    count = 0
                if count == 0:
                    group_offset = offset
                offset += len(line)
                count += 1
                start += 1
    except FileNotFoundError:
        raise DataError(f"{path}: no such data file (data.train_files / data.val_files)") from None
    if count:
        groups.append(RowGroup(path, len(groups), count, start - count, group_offset))
    try:
        keys = set(json.loads(first)) if first is not None else set()
    except ValueError as err:
        raise DataError(f"{path}: line 1 is not JSON: {err}") from None
    for column in columns:
        if column not in keys:
            raise DataError(f"{path}: line 1 has no '{column}' (it has {', '.join(sorted(keys))}); "
                            "set data.prompt_key/response_key or data.multiturn.messages_key")
    return groups


def _jsonl_rows(group: RowGroup) -> list:
    """The group's lines as rows; a line that is not a JSON object becomes a row that
    to_messages refuses, with its row number."""
    rows = []
    with open(group.file, "rb") as f:
        f.seek(group.offset)
        for _ in range(group.num_rows):
            line = f.readline()
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            rows.append(row if isinstance(row, dict) else {})
    return rows


def to_messages(row: dict, file: str, number: int, data) -> list[dict]:
    """The row as chat messages, or BadRow."""
    where = f"{file}: row {number}"
    if not row:
        raise BadRow(f"{where}: not a JSON object (one per line in a JSON Lines file)")
    if data.multiturn.enable:
        messages = row.get(data.multiturn.messages_key)
        if not isinstance(messages, list) or not messages:
            raise BadRow(f"{where}: '{data.multiturn.messages_key}' is not a non-empty list of messages")
    else:
        prompt, response = row.get(data.prompt_key), row.get(data.response_key)
        if isinstance(prompt, list):  # a chat prefix, as verl allows
            messages = list(prompt)
        elif isinstance(prompt, str):
            messages = [{"role": "user", "content": prompt}]
        else:
            raise BadRow(f"{where}: '{data.prompt_key}' must be a string, found {type(prompt).__name__}")
        if not isinstance(response, str):
            raise BadRow(f"{where}: '{data.response_key}' must be a string, found {type(response).__name__}")
        messages.append({"role": "assistant", "content": response})
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRow(f"{where}: message {i} is not a mapping with 'role' and 'content'")
        if message.get("role") not in ROLES:
            raise BadRow(f"{where}: message {i} has unknown role {message.get('role')!r} "
                         f"(expected one of {', '.join(ROLES)})")
        calls = message.get("tool_calls")
        if not isinstance(message.get("content"), str) and not (message["role"] == "assistant" and calls):
            raise BadRow(f"{where}: message {i} needs a string 'content'")
    assistant = [m for m in messages if m["role"] == "assistant"]
    if not assistant or not any((m.get("content") or "").strip() or m.get("tool_calls") for m in assistant):
        raise BadRow(f"{where}: no assistant response to learn from (empty response)")
    # what chat templates read; a parquet struct column gives every key, None where a row has none.
    # `content` stays, None too: DeepSeek-V3's template tells a tool-call turn by `content is none`.
    return [{k: v for k, v in m.items() if k in MESSAGE_KEYS and (v is not None or k == "content")}
            for m in messages]
