"""What megatron-core reads off a micro-batch's shape, kept under transformer-engine's packed
(THD) layout, in which the trainer lays a micro-batch's rows end to end as one sequence
(trainer.data.batches.collate).

DeepSeek-V3's sequence-level balance loss (megatron-core's seq_aux_loss) counts each row of a
[sequence, batch] micro-batch as a sequence. Laid end to end, the rows would count as one,
and the loss and its gradients would differ from the TE-free path's (by 16% in the gradient
norm of the tiny DeepSeek model, one sample per row: bench/te_check.py). Each THD micro-batch
records its rows on the model config; the router's sequence loss regroups its tokens by row.
"""

from __future__ import annotations


def mark_rows(config, rows: int, length: int) -> None:
    """The micro-batch about to run holds `rows` rows of `length` tokens, end to end."""
    config.thd_rows = (rows, length)


def install() -> None:
    from megatron.core.transformer.moe.router import TopKRouter

    original = TopKRouter._apply_seq_aux_loss
    if getattr(original, "by_row", False):
        return

    def seq_aux_loss_by_row(self, probs, scores_for_aux_loss, routing_map, seq_length, bsz, **kwargs):
        rows, length = getattr(self.config, "thd_rows", (1, seq_length))
        # only where this rank holds whole rows (no sequence or context parallel split)
        if bsz == 1 and rows > 1 and seq_length == rows * length:
            def by_row(t):  # [rows x length, E] row after row -> position-major, as [length, rows] has it
                return t.reshape(rows, length, -1).transpose(0, 1).reshape(seq_length, -1)

            scores_for_aux_loss, routing_map, seq_length, bsz = (
                by_row(scores_for_aux_loss), by_row(routing_map), length, rows)
        return original(self, probs, scores_for_aux_loss, routing_map, seq_length, bsz, **kwargs)

    seq_aux_loss_by_row.by_row = True
    TopKRouter._apply_seq_aux_loss = seq_aux_loss_by_row
