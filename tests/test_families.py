"""Each supported family builds from a shrunken copy of its real config.json and trains on the
CPU for a few steps (2 gloo ranks, EP=2): Mixtral, Qwen2-MoE (shared expert and its gate),
Qwen3-MoE (q/k norm), DeepSeek-V3 (multi-latent attention, shared expert, first dense layer,
sigmoid routing with expert bias, grouped top-k, routed scaling)."""

import json
import math
import shutil

import pytest

from tests.conftest import RECIPES
from tests.trainer_helpers import losses, train

pytest.importorskip("megatron.core")

SHRINK = {
    "mixtral_8x7b": {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "num_key_value_heads": 2, "num_local_experts": 4, "vocab_size": 512},
    "qwen2_moe_a2_7b": {"hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32,
                        "shared_expert_intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                        "num_key_value_heads": 4, "num_experts": 4, "num_experts_per_tok": 2, "vocab_size": 512},
    "qwen3_235b_a22b": {"hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32, "head_dim": 16,
                        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "num_experts": 8,
                        "num_experts_per_tok": 2, "vocab_size": 512, "max_window_layers": 2},
    "deepseek_v3": {"hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32, "num_hidden_layers": 3,
                    "first_k_dense_replace": 1, "num_attention_heads": 4, "num_key_value_heads": 4,
                    "q_lora_rank": 48, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8,
                    "v_head_dim": 16, "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1,
                    "vocab_size": 512, "max_position_embeddings": 4096, "quantization_config": None},
}


@pytest.mark.parametrize("family", sorted(SHRINK))
def test_family_builds_and_trains(tmp_path, family):
    """Each family's tiny model trains under EP=2 and its loss falls; DeepSeek-V3 with its
    multi-token-prediction layer on (its release has one), whose loss falls too."""
    model = tmp_path / "model"
    model.mkdir()
    config = json.loads((RECIPES / "models" / family / "config.json").read_text())
    config.update(SHRINK[family])
    config = {k: v for k, v in config.items() if v is not None}
    (model / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(RECIPES / "models" / "tiny_moe" / name, model / name)
    mtp = family == "deepseek_v3"
    _, _, metrics = train(tmp_path / "run", f"model.path={model}", "trainer.total_training_steps=6",
                          "data.val_files=[]", "trainer.save_freq=-1", "megatron.expert_model_parallel_size=2",
                          f"model.enable_mtp={str(mtp).lower()}")
    found = losses(metrics)
    assert len(found) == 6 and all(math.isfinite(x) for x in found)
    assert found[-1] < found[0]
    if mtp:
        steps = [m["mtp_loss"] for m in metrics if "loss" in m]
        assert all(x is not None and math.isfinite(x) and x > 0 for x in steps)
        assert steps[-1] < steps[0]


MTP_SHIFT_UNDER_CP = """
import os, torch, torch.distributed as dist
dist.init_process_group("gloo")
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer import multi_token_prediction as mtp
from trainer.model import thd

cp, rank = dist.get_world_size(), dist.get_rank()
real_lengths, padded_lengths = [5, 9, 6, 7], [8, 12, 8, 8]  # samples padded to multiples of 2 x CP
cu = lambda lengths: torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu(real_lengths), cu_seqlens_kv=cu(real_lengths),
                         cu_seqlens_q_padded=cu(padded_lengths), cu_seqlens_kv_padded=cu(padded_lengths))
whole = torch.arange(1.0, sum(padded_lengths) + 1)[None]

def this_ranks_part(t):  # transformer-engine's split: chunks r and 2CP-1-r of every sample's span
    parts, start = [], 0
    for length in padded_lengths:
        chunk = length // (2 * cp)
        parts += [t[..., start + rank * chunk: start + (rank + 1) * chunk],
                  t[..., start + (2 * cp - 1 - rank) * chunk: start + (2 * cp - rank) * chunk]]
        start += length
    return torch.cat(parts, dim=-1)

shifted, start = whole.clone(), 0  # each sample's span one place left, its last place zero
for length in padded_lengths:
    shifted[..., start:start + length - 1] = whole[..., start + 1:start + length]
    shifted[..., start + length - 1] = 0
    start += length
expected = this_ranks_part(shifted)
group = dist.new_group(list(range(cp)))
megatron_cores, _ = mtp.roll_tensor(this_ranks_part(whole), -1, -1, group, params)
thd.install()
ours, _ = mtp.roll_tensor(this_ranks_part(whole), -1, -1, group, params)
assert torch.equal(ours, expected), (rank, ours, expected)
assert not torch.equal(megatron_cores, expected)  # its boundaries unpadded: the shift misplaced
print("shift equal", rank)
"""


def test_multi_token_prediction_shifts_each_sample_under_context_parallel_packed_sequences(tmp_path):
    """Under transformer-engine's packed sequences with CP=2, the multi-token-prediction shift
    (of labels, loss mask, tokens) on each rank's chunks equals shifting the whole sequence
    within each sample and splitting it after; megatron-core's own shift, which takes the
    samples' unpadded boundaries, misplaces it."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    script = tmp_path / "shift.py"
    script.write_text(MTP_SHIFT_UNDER_CP)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(script)], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert done.returncode == 0 and done.stdout.count("shift equal") == 2, (done.stdout + done.stderr)[-3000:]
