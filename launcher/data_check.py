"""`launcher data check`: what the recipe's data gives the trainer, before a job waits in a queue.

Reads the first rows of the training files (in file order) with the recipe's tokenizer,
chat template and template options, exactly as the trainer does (trainer.data), and counts
rows, turns, tokens, learned tokens, truncated and bad rows, and how full packed rows are.
Three rendered samples show the learned text between « and ». It needs transformers (which
loads torch where it is installed), not megatron-core.

With a cluster profile, the recipe's paths are read as that cluster's job sees them: a path
inside a container mount (`container.mounts`, host:container) is read at its host side, so
the check runs on the login node against the files the job will open.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DataReport:
    files: list[str]
    rows_read: int = 0
    turns: int = 0
    tokens: int = 0
    learned: int = 0
    longest: int = 0
    truncated: int = 0
    bad: int = 0
    bad_reasons: list[str] = field(default_factory=list)
    packed_rows: int = 0
    row_length: int = 0
    rows_in_files: int = 0
    global_batch_size: int = 1
    samples: list[str] = field(default_factory=list)

    @property
    def usable(self) -> int:
        return self.rows_read - self.bad

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps an epoch of all the files gives, at the rows read's packing."""
        if not self.rows_read:
            return 0
        packed = self.packed_rows * self.rows_in_files / self.rows_read
        return max(1, round(packed / self.global_batch_size)) if packed else 0

    @property
    def packing_efficiency(self) -> float:
        return self.tokens / (self.packed_rows * self.row_length) if self.packed_rows else 0.0

    def to_dict(self) -> dict:
        return {"files": self.files, "rows_read": self.rows_read, "usable_rows": self.usable, "bad_rows": self.bad,
                "bad_reasons": self.bad_reasons, "turns": self.turns, "tokens": self.tokens,
                "learned_tokens": self.learned, "longest_tokens": self.longest, "truncated_rows": self.truncated,
                "packed_rows": self.packed_rows, "row_length": self.row_length,
                "packing_efficiency": round(self.packing_efficiency, 4), "rows_in_files": self.rows_in_files,
                "steps_per_epoch": self.steps_per_epoch, "samples": self.samples}


def as_seen_on(recipe, cluster):
    """The recipe with its data and tokenizer paths read where `cluster`'s job reads them."""
    if cluster is None or cluster.container.runtime == "none":
        return recipe
    mounts = sorted((m.split(":")[:2] for m in cluster.container.mounts if ":" in m), key=lambda m: -len(m[1]))

    def host(path: str) -> str:
        for outside, inside in mounts:
            if path == inside or path.startswith(inside.rstrip("/") + "/"):
                return outside.rstrip("/") + path[len(inside.rstrip("/")):]
        return path

    data = recipe.data
    data.train_files = [host(f) for f in data.train_files]
    data.val_files = [host(f) for f in data.val_files]
    recipe.model.tokenizer_path = host(recipe.model.tokenizer_path)
    return recipe


def check(recipe, max_rows: int, show: int = 3) -> DataReport:
    from trainer.data.batches import SFTData, packed_groups
    from trainer.data.chat import load_tokenizer, tokenize_conversation
    from trainer.data.parquet import BadRow, shuffled_rows, to_messages

    data = recipe.data
    tokenizer = load_tokenizer(recipe.model.tokenizer_path)
    reader = SFTData(data.train_files, data, tokenizer, recipe.trainer.seed)  # its files, columns and truncation
    report = DataReport(files=data.train_files, row_length=data.max_length, global_batch_size=data.global_batch_size,
                        rows_in_files=sum(group.num_rows for group in reader.groups))
    samples = []
    for file, number, row in shuffled_rows(reader.groups, reader.columns, 0, 0, shuffle=False):
        if report.rows_read >= max_rows:
            break
        report.rows_read += 1
        where = f"{file}: row {number}"
        try:
            messages = to_messages(row, file, number, data)
            ids, mask = tokenize_conversation(tokenizer, messages, where, data.apply_chat_template_kwargs)
            before = reader.counts["samples_truncated"]
            ids, mask = reader.fit(ids, mask, where)
        except BadRow as err:
            report.bad += 1
            if len(report.bad_reasons) < 5:
                report.bad_reasons.append(str(err))
            continue
        report.truncated += reader.counts["samples_truncated"] - before
        report.turns += len(messages)
        report.tokens += len(ids)
        report.learned += sum(mask[1:])  # a token is learned as the label of the one before it
        report.longest = max(report.longest, len(ids))
        samples.append((ids, mask))
        if len(report.samples) < show:
            report.samples.append(marked(tokenizer, ids, mask))
    report.packed_rows = sum(1 for _ in packed_groups(samples, data.max_length, data.pack_sequences))
    return report


def marked(tokenizer, ids: list[int], mask: list[int]) -> str:
    """The sample's text with each learned run between « and »."""
    parts, run, learned = [], [], None
    for token, m in zip(ids, mask):
        if learned is not None and bool(m) != learned:
            parts.append(_run(tokenizer, run, learned))
            run = []
        run.append(token)
        learned = bool(m)
    if run:
        parts.append(_run(tokenizer, run, learned))
    return "".join(parts)


def _run(tokenizer, ids: list[int], learned: bool) -> str:
    text = tokenizer.decode(ids)
    return f"«{text}»" if learned else text


def text(report: DataReport, recipe_path: str, skip_bad_rows: bool, truncation: str) -> str:
    r = report
    per = lambda n: f"{n / max(r.usable, 1):,.1f} a row"  # noqa: E731
    lines = [
        f"data check  {recipe_path}: {len(r.files)} training file(s), first {r.rows_read:,} rows",
        f"rows        {r.rows_read:,} read, {r.usable:,} usable, {r.bad:,} bad",
        f"turns       {r.turns:,} ({per(r.turns)})",
        f"tokens      {r.tokens:,} ({per(r.tokens)}; longest {r.longest:,})",
        f"learned     {r.learned:,} tokens ({r.learned / max(r.tokens, 1):.1%} of all)",
        f"truncated   {r.truncated:,} rows (data.truncation: {truncation})",
        f"packing     {r.packed_rows:,} rows of {r.row_length:,} tokens, {r.packing_efficiency:.1%} filled",
        f"epoch       {r.rows_in_files:,} rows in the files: about {r.steps_per_epoch:,} steps of "
        f"{r.global_batch_size:,} packed rows",
    ]
    for reason in r.bad_reasons:
        lines.append(f"bad row     {reason}")
    if r.bad and not skip_bad_rows:
        lines.append("            the job would stop at the first bad row: fix the rows or set data.skip_bad_rows: true")
    for i, sample in enumerate(r.samples, 1):
        lines.append(f"--- sample {i} (learned text between « and ») ---")
        lines.append(sample)
    return "\n".join(lines)
