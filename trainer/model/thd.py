"""What megatron-core reads off a micro-batch's shape, kept under transformer-engine's packed
(THD) layout, in which the trainer lays a micro-batch's rows end to end as one sequence
(trainer.data.batches.collate).

DeepSeek-V3's sequence-level balance loss (megatron-core's seq_aux_loss) counts each row of a
[sequence, batch] micro-batch as a sequence. Laid end to end, the rows would count as one,
and the loss and its gradients would differ from the TE-free path's (by 16% in the gradient
norm of the tiny DeepSeek model, one sample per row: bench/te_check.py). Each THD micro-batch
records its rows on the model config; the router's sequence loss regroups its tokens by row.

Multi-token prediction shifts its labels, loss mask, tokens and positions one place left within
each sample (megatron-core's roll_tensor). Under context parallelism each rank holds two chunks
of every sample's span - the sample padded to a multiple of 2 x CP - and megatron-core finds a
sample's local part by dividing its boundaries by CP; it divides the unpadded ones
(cu_seqlens_q), so past the first sample whose length is not such a multiple the shift lands in
the wrong place (or fails on a sample shorter than 2 x CP): the MTP loss trains on misplaced
labels. It is the likely cause of the tiny DeepSeek model's gradient norm coming out 7.2% low
under CP=2 (bench/results/te_check_cp_h200x4.json; not re-run on GPUs since). Shifting within
the padded spans (the padding's labels are masked out) gives the unsplit sequence's shift.
"""

from __future__ import annotations


def mark_rows(config, rows: int, length: int) -> None:
    """The micro-batch about to run holds `rows` rows of `length` tokens, end to end."""
    config.thd_rows = (rows, length)


def install() -> None:
    _shift_within_padded_spans()
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


def _shift_within_padded_spans() -> None:
    import dataclasses

    from megatron.core.models.gpt import gpt_model
    from megatron.core.transformer import multi_token_prediction as mtp

    original = mtp.roll_tensor
    if getattr(original, "padded_spans", False):
        return

    def roll_tensor(tensor, shifts=-1, dims=-1, cp_group=None, packed_seq_params=None, **kwargs):
        padded = getattr(packed_seq_params, "cu_seqlens_q_padded", None)
        if padded is not None:
            packed_seq_params = dataclasses.replace(packed_seq_params, cu_seqlens_q=padded)
        return original(tensor, shifts, dims, cp_group, packed_seq_params, **kwargs)

    roll_tensor.padded_spans = True
    mtp.roll_tensor = roll_tensor
    if getattr(gpt_model, "roll_tensor", None) is original:  # imported by name there
        gpt_model.roll_tensor = roll_tensor
