"""`launcher convert`: Hugging Face <-> megatron-core checkpoints for the four families, on tiny
random models built with transformers (multi-shard safetensors), checked by exact round trips
and by logits against transformers under EP=1 and EP=2 (2 gloo ranks)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, run_launcher
from tests.hf_models import FAMILIES, read_all, save_tiny_model
from tests.trainer_helpers import train

pytest.importorskip("megatron.core")
pytest.importorskip("transformers")

ENV = {"OMP_NUM_THREADS": "1"}


def convert(*args, nproc=None):
    extra = ["--nproc", str(nproc)] if nproc else []
    return run_launcher("convert", *args, *extra, env=ENV, timeout=600)


def verify(hf, mcore, ep=1, tp=1):
    """The verify command, alone or on 2 gloo ranks under torchrun (EP=2 or TP=2)."""
    command = ["-m", "trainer.convert", "verify", "--hf-model-path", str(hf), "--mcore-path", str(mcore),
               "--ep", str(ep), "--tp", str(tp)]
    if ep * tp > 1:
        command = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ep * tp}", *command]
    command = [sys.executable, *command]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **ENV, "PYTHONPATH": str(REPO)})
    line = [x for x in proc.stdout.splitlines() if x.startswith("verify:")]
    assert proc.returncode == 0 and line, proc.stdout[-2000:] + proc.stderr[-3000:]
    return float(line[0].split("difference| ")[1].split()[0])


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_is_exact_and_logits_match_transformers(tmp_path, family):
    hf = save_tiny_model(family, tmp_path / "hf")
    assert len(list(hf.glob("*.safetensors"))) > 1  # several shards
    rc, out, err = convert("hf-to-mcore", "--hf-model-path", hf, "--output-path", tmp_path / "mcore", "--json")
    assert rc == 0, err
    summary = json.loads(out.splitlines()[-1])
    assert summary["tensors"] > 0 and summary["bytes_read"] > 0
    assert "hf-to-mcore [" in err  # the progress bar

    rc, _, err = convert("mcore-to-hf", "--mcore-path", tmp_path / "mcore", "--hf-model-path", hf,
                         "--output-path", tmp_path / "back")
    assert rc == 0, err
    original, back = read_all(hf), read_all(tmp_path / "back")
    assert set(back) == set(original)
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(original)

    # (one process, EP=1: tests/test_lora.py verifies every family's merged export that way)
    assert verify(hf, tmp_path / "mcore", ep=2) < 1e-4
    if family == "qwen3_235b_a22b":  # tensor parallel with sequence parallelism, experts sharded too
        assert verify(hf, tmp_path / "mcore", tp=2) < 1e-4


def test_trained_checkpoint_converts_back_to_a_transformers_model(tmp_path):
    """Convert in, fine-tune from it under EP=2, convert the trainer's checkpoint out: transformers
    loads the result and its logits are the trained megatron-core model's."""
    family = "qwen3_235b_a22b"
    hf = save_tiny_model(family, tmp_path / "hf")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (hf / name).write_bytes((REPO / "recipes" / "models" / "tiny_moe" / name).read_bytes())
    assert convert("hf-to-mcore", "--hf-model-path", hf, "--output-path", tmp_path / "mcore")[0] == 0
    train(tmp_path / "run", f"model.path={hf}", f"megatron.dist_checkpointing_path={tmp_path / 'mcore'}",
          "trainer.total_training_steps=3", "data.val_files=[]", "megatron.expert_model_parallel_size=2")
    checkpoints = tmp_path / "run" / "checkpoints"
    rc, _, err = convert("mcore-to-hf", "--mcore-path", checkpoints, "--hf-model-path", hf,
                         "--output-path", tmp_path / "trained")
    assert rc == 0, err
    before, after = read_all(hf), read_all(tmp_path / "trained")
    assert set(after) == set(before) and (tmp_path / "trained" / "tokenizer.json").exists()
    assert any(not torch.equal(before[n], after[n]) for n in before)  # training changed the weights
    assert verify(tmp_path / "trained", checkpoints / "step_000003") < 1e-4


def test_fp8_weights_are_dequantised(tmp_path):
    """DeepSeek-V3's release format: float8 weights with one scale per 128x128 block."""
    from safetensors.torch import load_file, save_file

    hf = save_tiny_model("deepseek_v3", tmp_path / "hf", n_routed_experts=4, num_experts_per_tok=2, n_group=2,
                         topk_group=1, hidden_size=160, moe_intermediate_size=144)
    fp8, originals = {}, {}
    for file in sorted(hf.glob("*.safetensors")):
        tensors = load_file(file)
        for name, t in list(tensors.items()):
            if name.endswith("proj.weight") and t.dim() == 2:
                rows, cols = t.shape
                blocks = t.new_zeros(-(-rows // 128), -(-cols // 128))
                for i in range(blocks.shape[0]):
                    for j in range(blocks.shape[1]):
                        blocks[i, j] = t[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].abs().max() / 448
                scale = blocks.repeat_interleave(128, 0)[:rows].repeat_interleave(128, 1)[:, :cols]
                tensors[name] = (t / scale).to(torch.float8_e4m3fn)
                tensors[name + "_scale_inv"] = blocks
                originals[name] = t
                fp8[name] = (tensors[name].float() * scale).to(torch.bfloat16)
        save_file(tensors, str(file), metadata={"format": "pt"})
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    for name in originals:
        index["weight_map"][name + "_scale_inv"] = index["weight_map"][name]
    (hf / "model.safetensors.index.json").write_text(json.dumps(index))
    config = json.loads((hf / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [128, 128]}
    config["torch_dtype"] = "bfloat16"  # as released: the unquantised tensors are bf16
    (hf / "config.json").write_text(json.dumps(config))
    assert any(t.shape[0] > 128 and t.shape[1] > 128 for t in originals.values())  # several blocks, partial ones

    assert convert("hf-to-mcore", "--hf-model-path", hf, "--output-path", tmp_path / "mcore")[0] == 0
    rc, out, err = convert("mcore-to-hf", "--mcore-path", tmp_path / "mcore", "--hf-model-path", hf,
                           "--output-path", tmp_path / "back")
    assert rc == 0, err
    back = read_all(tmp_path / "back")
    assert not any(n.endswith("_scale_inv") for n in back)
    for name, expected in fp8.items():
        assert back[name].dtype == torch.bfloat16 and torch.equal(back[name], expected), name
        error = (back[name].float() - originals[name]).abs().max() / originals[name].abs().max()
        assert error < 0.1, name  # close to the unquantised weight: the scales were applied
    assert "quantization_config" not in json.loads((tmp_path / "back" / "config.json").read_text())
    assert "quantization_config left out" in out


def _add_mtp_layer(hf, layers):
    """DeepSeek-V3's checkpoint layout: the MTP layer is model.layers.<num_hidden_layers>, a full
    MoE layer plus enorm/hnorm/eh_proj/shared_head, with copies of the embedding and head."""
    from safetensors.torch import save_file

    tensors = read_all(hf)
    n, extra = layers, {}
    for name, t in tensors.items():
        if name.startswith(f"model.layers.{n - 1}."):
            extra[name.replace(f"model.layers.{n - 1}.", f"model.layers.{n}.")] = t.clone() + 0.01
    hidden = tensors["model.norm.weight"].shape[0]
    extra.update({f"model.layers.{n}.enorm.weight": torch.rand(hidden), f"model.layers.{n}.hnorm.weight": torch.rand(hidden),
                  f"model.layers.{n}.eh_proj.weight": torch.randn(hidden, 2 * hidden) * 0.02,
                  f"model.layers.{n}.shared_head.norm.weight": torch.rand(hidden),
                  f"model.layers.{n}.embed_tokens.weight": tensors["model.embed_tokens.weight"].clone(),
                  f"model.layers.{n}.shared_head.head.weight": tensors["lm_head.weight"].clone()})
    save_file(extra, str(hf / "model-mtp.safetensors"), metadata={"format": "pt"})
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    index["weight_map"].update({k: "model-mtp.safetensors" for k in extra})
    (hf / "model.safetensors.index.json").write_text(json.dumps(index))
    config = json.loads((hf / "config.json").read_text())
    config["num_nextn_predict_layers"] = 1
    (hf / "config.json").write_text(json.dumps(config))
    return extra


def test_deepseek_multi_token_prediction_layer(tmp_path):
    hf = save_tiny_model("deepseek_v3", tmp_path / "hf")
    extra = _add_mtp_layer(hf, layers=3)
    rc, out, err = convert("hf-to-mcore", "--hf-model-path", hf, "--output-path", tmp_path / "no-mtp")
    assert rc == 0, err
    assert f"left out {len(extra)} tensors of the multi-token-prediction layer (model.layers.3.*)" in out

    assert convert("hf-to-mcore", "--hf-model-path", hf, "--output-path", tmp_path / "mtp", "--mtp")[0] == 0
    rc, _, err = convert("mcore-to-hf", "--mcore-path", tmp_path / "mtp", "--hf-model-path", hf,
                         "--output-path", tmp_path / "back")
    assert rc == 0, err
    original, back = read_all(hf), read_all(tmp_path / "back")
    assert set(back) == set(original)
    assert all(torch.equal(back[n], original[n]) for n in original)


def test_bad_checkpoints_are_one_line_errors(tmp_path):
    from safetensors.torch import save_file

    hf = save_tiny_model("mixtral_8x7b", tmp_path / "hf")
    save_file({"model.layers.0.block_sparse_moe.extra.weight": torch.zeros(2)}, str(hf / "model-extra.safetensors"))
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.block_sparse_moe.extra.weight"] = "model-extra.safetensors"
    (hf / "model.safetensors.index.json").write_text(json.dumps(index))
    rc, _, err = convert("hf-to-mcore", "--hf-model-path", hf, "--output-path", tmp_path / "out")
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "model.layers.0.block_sparse_moe.extra.weight" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()

    del index["weight_map"]["model.layers.0.block_sparse_moe.extra.weight"]
    del index["weight_map"]["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    (hf / "model.safetensors.index.json").write_text(json.dumps(index))
    rc, _, err = convert("hf-to-mcore", "--hf-model-path", hf, "--output-path", tmp_path / "out")
    assert rc == 2 and "model.layers.1.block_sparse_moe.experts.2.w3.weight" in err and "missing" in err

    rc, _, err = convert("mcore-to-hf", "--mcore-path", tmp_path / "nothing", "--hf-model-path", hf,
                         "--output-path", tmp_path / "out")
    assert rc == 2 and "not a torch_dist checkpoint" in err


def test_memory_stays_bounded_by_the_shards_and_ranks_split_the_work(tmp_path):
    """A 8-shard checkpoint of ~200 MB converts with a peak RSS far below the model size, and two
    processes (--nproc 2) write the same checkpoint as one."""
    sys.path.insert(0, str(REPO / "scripts"))
    from synthetic_checkpoint import write

    from trainer.convert import mcore_files

    write(tmp_path / "small", layers=1, hidden=64, ffn=64, experts=2, vocab=256, shard_mib=1)
    big = write(tmp_path / "big", layers=4, hidden=512, ffn=1024, experts=8, vocab=4096, shard_mib=24,
                dtype=torch.float32)
    assert big["shards"] >= 8 and big["bytes"] > 6 * big["largest_shard"]
    rss = {}
    for name in ("small", "big"):
        rc, out, err = convert("hf-to-mcore", "--hf-model-path", tmp_path / name, "--output-path",
                               tmp_path / f"{name}-mcore", "--json")
        assert rc == 0, err
        rss[name] = json.loads(out.splitlines()[-1])["peak_rss_gib"] * 2**30
    growth = rss["big"] - rss["small"]  # the same interpreter, torch and megatron-core imports
    assert growth < 3 * big["largest_shard"], (growth / 2**20, big)

    rc, _, err = convert("hf-to-mcore", "--hf-model-path", tmp_path / "big", "--output-path", tmp_path / "two",
                         nproc=2)
    assert rc == 0, err
    assert len(list((tmp_path / "two").glob("*.distcp"))) == 2
    one, two = mcore_files.tensor_specs(tmp_path / "big-mcore"), mcore_files.tensor_specs(tmp_path / "two")
    assert one == two
    keys = sorted(one)[::7]
    a = mcore_files.read(tmp_path / "big-mcore", [one[k] for k in keys])
    b = mcore_files.read(tmp_path / "two", [two[k] for k in keys])
    assert all(torch.equal(a[k], b[k]) for k in keys)
