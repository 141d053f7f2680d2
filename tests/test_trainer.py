"""The trainer for real: megatron-core on the CPU over gloo, 1 or 2 ranks, the tiny recipe.

Layout equivalence runs start from one shared checkpoint (trained 1 step with lr=0, so it
holds the initial weights) loaded through megatron.dist_checkpointing_path.
"""

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tests.conftest import REPO
from tests.trainer_helpers import losses, plain_tensors, train
from trainer.routing import expert_parallel_load

pytest.importorskip("megatron.core")

# A constant LR, and no aux loss: with sequence parallelism (TP > 1) megatron-core computes the
# load-balancing loss per sequence shard, so TP changes that term (not the LM loss) slightly.
STEADY = ["optim.lr_scheduler=constant", "optim.lr_warmup_steps_ratio=0", "optim.lr=0.003", "optim.min_lr=0",
          "trainer.test_freq=-1", "trainer.save_freq=-1", "data.val_files=[]",
          "model.override_config.moe_config.aux_loss_coeff=0"]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, init_checkpoint):
    """EP=2 over 2 ranks, 6 steps, a checkpoint at step 3."""
    run = tmp_path_factory.mktemp("ep2")
    _, _, metrics = train(run, f"megatron.dist_checkpointing_path={init_checkpoint}", "trainer.total_training_steps=6",
                          *STEADY, "megatron.expert_model_parallel_size=2", "trainer.save_freq=3")
    return run, losses(metrics)


def test_loss_falls_and_validation_is_logged(tmp_path):
    _, log, metrics = train(tmp_path, "trainer.total_training_steps=30", "trainer.test_freq=15")
    train_losses = losses(metrics)
    assert len(train_losses) == 30 and train_losses[-1] < 0.5 * train_losses[0]
    val = [m for m in metrics if "val_loss" in m]
    assert [m["step"] for m in val] == [15, 30] and val[-1]["val_loss"] < val[0]["val_loss"]
    last = [m for m in metrics if "loss" in m][-1]
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "tflops_per_gpu", "mfu", "moe_aux_loss",
                "tokens_per_expert", "gc_pause_s"):
        assert key in last
    routed = last["tokens_per_expert"]
    assert set(routed) == {"layer_0", "layer_1"} and all(len(v) == 4 for v in routed.values())
    # top-2 routing: every response and prompt token goes to 2 experts
    assert sum(routed["layer_0"]) == sum(routed["layer_1"]) > 0
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_000030"
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))
    assert "done: 30 steps" in log


@pytest.mark.parametrize("layout", [
    ["megatron.expert_model_parallel_size=1"],
    ["megatron.expert_model_parallel_size=1", "megatron.pipeline_model_parallel_size=2"],
    ["megatron.expert_model_parallel_size=1", "megatron.tensor_model_parallel_size=2"],
    # experts replicated over the TP ranks: their gradients must be summed over them
    ["megatron.expert_model_parallel_size=1", "megatron.tensor_model_parallel_size=2",
     "megatron.expert_tensor_parallel_size=1"],
    # context parallelism: each rank holds two sequence chunks, the loss counts over both ranks
    ["megatron.expert_model_parallel_size=1", "megatron.context_parallel_size=2"],
    # the experts' tokens gathered from both ranks and their outputs reduced back (trainer.model.dispatch)
    ["model.override_config.moe_config.token_dispatcher=allgather"],
], ids=["ep1", "pp2", "tp2", "tp2-etp1", "cp2", "ep2-allgather"])
def test_layouts_give_the_same_losses_as_ep2(tmp_path, init_checkpoint, baseline, layout):
    _, expected = baseline
    _, _, metrics = train(tmp_path, f"megatron.dist_checkpointing_path={init_checkpoint}",
                          "trainer.total_training_steps=6", *STEADY, *layout)
    assert losses(metrics) == pytest.approx(expected, rel=1e-5)


def test_z_loss_capacity_factor_and_forced_balance_act_on_training(tmp_path, init_checkpoint, baseline):
    """Router z-loss adds to the gradients but not to the LM loss; a capacity factor drops
    tokens, which changes the output, and the metrics say how many; padding every expert to
    that capacity changes nothing but the shapes, with either dispatcher; forced load balancing
    routes to random experts."""
    run, _ = baseline
    first = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][0]
    moe = "model.override_config.moe_config"
    _, _, z = train(tmp_path / "z", f"megatron.dist_checkpointing_path={init_checkpoint}",
                    "trainer.total_training_steps=1", *STEADY, f"{moe}.z_loss_coeff=0.1")
    assert z[0]["loss"] == pytest.approx(first["loss"], rel=1e-6)
    assert abs(z[0]["grad_norm"] - first["grad_norm"]) > 1e-4 * first["grad_norm"]
    _, _, dropped = train(tmp_path / "cf", f"megatron.dist_checkpointing_path={init_checkpoint}",
                          "trainer.total_training_steps=1", *STEADY, f"{moe}.capacity_factor=0.5")
    # at initialisation the experts' output is small, so dropping tokens moves the loss a little
    assert abs(dropped[0]["loss"] - first["loss"]) > 2e-6 * first["loss"]
    # the counts are the router's choices: top-2 for every token, and in the first layer (whose
    # input the dropping has not touched yet) those of the run without a capacity; at most half
    # of them fit under capacity 0.5
    for layer, counts in dropped[0]["tokens_per_expert"].items():
        assert sum(counts) == sum(first["tokens_per_expert"][layer])
    assert dropped[0]["tokens_per_expert"]["layer_0"] == first["tokens_per_expert"]["layer_0"]
    assert "moe_dropped_fraction" not in first
    # EP=2: the busier rank's routed tokens against an even split's
    assert first["expert_parallel_load"] == pytest.approx(expert_parallel_load(first["tokens_per_expert"], 2))
    assert first["expert_parallel_load"] >= 1
    assert 0.5 <= dropped[0]["moe_dropped_fraction"] < 1
    _, _, padded = train(tmp_path / "pad", f"megatron.dist_checkpointing_path={init_checkpoint}",
                         "trainer.total_training_steps=1", *STEADY, f"{moe}.capacity_factor=0.5",
                         f"{moe}.pad_to_capacity=true")
    assert padded[0]["loss"] == pytest.approx(dropped[0]["loss"], rel=1e-6)
    assert padded[0]["grad_norm"] == pytest.approx(dropped[0]["grad_norm"], rel=1e-5)
    assert padded[0]["moe_dropped_fraction"] == dropped[0]["moe_dropped_fraction"]
    assert padded[0]["tokens_per_expert"] == dropped[0]["tokens_per_expert"]  # not the padded map
    # the all-gather dispatcher, padded (trainer.model.dispatch's static path): the same training
    _, _, gathered = train(tmp_path / "ag", f"megatron.dist_checkpointing_path={init_checkpoint}",
                           "trainer.total_training_steps=1", *STEADY, f"{moe}.capacity_factor=0.5",
                           f"{moe}.pad_to_capacity=true", f"{moe}.token_dispatcher=allgather")
    assert gathered[0]["loss"] == pytest.approx(padded[0]["loss"], rel=1e-6)
    assert gathered[0]["grad_norm"] == pytest.approx(padded[0]["grad_norm"], rel=1e-5)
    assert gathered[0]["moe_dropped_fraction"] == padded[0]["moe_dropped_fraction"]
    # benchmarking's random routing: other experts than the router's, every token still routed top-k
    _, _, forced = train(tmp_path / "fb", f"megatron.dist_checkpointing_path={init_checkpoint}",
                         "trainer.total_training_steps=1", *STEADY, f"{moe}.force_load_balancing=true")
    for layer, counts in forced[0]["tokens_per_expert"].items():
        assert counts != first["tokens_per_expert"][layer] and sum(counts) == sum(first["tokens_per_expert"][layer])


def test_expert_parallel_load_is_the_busiest_ranks_tokens_over_the_mean():
    """Each MoE layer waits for its busiest EP rank: the sum of those loads over the even ones."""
    # four experts on two ranks: layer_0 routes everything to rank 0's two (2x), layer_1 evenly
    assert expert_parallel_load({"layer_0": [3, 1, 0, 0], "layer_1": [1, 1, 1, 1]}, 2) == 6 / 4
    assert expert_parallel_load({"layer_0": [3, 1, 0, 0]}, 1) is None
    # a GPU run's metrics (bench/results; README, "Padding experts to capacity"): the untrained
    # router of the benchmark model loaded the busier of two ranks 1.21-1.43 x the mean
    measured = REPO / "bench" / "results" / "te_ag_mb8_h200x2.ep2_allgather-g2-mb8.metrics.jsonl"
    loads = [expert_parallel_load(json.loads(line)["tokens_per_expert"], 2)
             for line in measured.read_text().splitlines()]
    assert len(loads) == 8 and 1.2 < min(loads) and max(loads) < 1.45


def test_grad_offload_releases_gradients_without_changing_training(tmp_path, init_checkpoint, baseline):
    """megatron.grad_offload empties the gradient buffers around the checkpoint at step 3 and
    refills them (zeroed) for step 4: the losses are those of the baseline run."""
    _, expected = baseline
    _, log, metrics = train(tmp_path, f"megatron.dist_checkpointing_path={init_checkpoint}",
                            "trainer.total_training_steps=6", *STEADY, "megatron.expert_model_parallel_size=2",
                            "trainer.save_freq=3", "megatron.grad_offload=true")
    assert losses(metrics) == pytest.approx(expected, rel=1e-6)
    assert (tmp_path / "checkpoints" / "step_000003").is_dir()


def test_overlapped_gradient_reduce_and_parameter_gather_train_and_save_like_the_baseline(
        tmp_path, init_checkpoint, baseline):
    """megatron.overlap_grad_reduce and overlap_param_gather (the dense weights are data-parallel
    over the 2 ranks), in buckets of 20k parameters as a large model has them (each bucket's
    gather is started by the previous one's, in forward order: a weight used outside its module's
    forward broke that chain on GPUs): the baseline's losses, and its checkpoint at step 3 -
    written after an optimizer step whose weights the other rank would only gather in the next
    forward - holds the baseline's weights at step 3."""
    run, expected = baseline
    _, _, metrics = train(tmp_path, f"megatron.dist_checkpointing_path={init_checkpoint}",
                          "trainer.total_training_steps=6", *STEADY, "megatron.expert_model_parallel_size=2",
                          "trainer.save_freq=3", "megatron.overlap_grad_reduce=true", "megatron.overlap_param_gather=true",
                          "megatron.ddp_bucket_size=20000")
    assert losses(metrics) == pytest.approx(expected, rel=1e-5)
    saved = plain_tensors(tmp_path / "checkpoints" / "step_000003")
    reference = plain_tensors(run / "checkpoints" / "step_000003")
    weights = [k for k in reference if not k.startswith("optimizer.")]
    assert weights and set(weights) <= set(saved)
    for key in weights:
        assert torch.allclose(saved[key], reference[key], rtol=1e-4, atol=1e-6), key


def test_save_under_ep2_resume_under_ep1(tmp_path, baseline):
    run, expected = baseline
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(run / "checkpoints" / "step_000003", checkpoints / "step_000003")
    (checkpoints / "latest").write_text("step_000003\n")
    _, log, metrics = train(tmp_path, "trainer.total_training_steps=6", *STEADY, "megatron.expert_model_parallel_size=1")
    assert "resumed from" in log and "at step 3" in log
    assert [m["step"] for m in metrics if "loss" in m] == [4, 5, 6]
    assert losses(metrics) == pytest.approx(expected[3:], rel=1e-5)


def test_frozen_router_stays_bit_identical(tmp_path, init_checkpoint):
    train(tmp_path, f"megatron.dist_checkpointing_path={init_checkpoint}", "trainer.total_training_steps=3", *STEADY,
          "model.override_config.moe_config.freeze_moe_router=true")
    before = plain_tensors(init_checkpoint)
    after = plain_tensors(tmp_path / "checkpoints" / "step_000003")
    routers = [k for k in before if ".router." in k and not k.startswith("optimizer.")]
    assert routers
    for key in routers:
        assert torch.equal(before[key], after[key]), key
    assert not torch.equal(before["decoder.layers.0.self_attention.linear_qkv.weight"],
                           after["decoder.layers.0.self_attention.linear_qkv.weight"])


def unequal_data(path):
    """Short responses first, then long ones: without shuffling, rank 0 gets the short ones."""
    short = [{"prompt": f"Count: apple{i}", "response": "1"} for i in range(4)]
    long = [{"prompt": "Reverse: x", "response": " ".join(["river stone cloud green"] * 6)} for _ in range(4)]
    rows = short + long
    pq.write_table(pa.table({"prompt": [r["prompt"] for r in rows], "response": [r["response"] for r in rows]}), path)
    return path


def test_loss_is_the_mean_over_all_response_tokens_of_the_global_batch(tmp_path, init_checkpoint):
    """DP=2 with unequal response lengths per rank and two micro-batches each must match
    one rank that sees the whole batch: same loss and same gradient norm."""
    data = unequal_data(tmp_path / "unequal.parquet")
    common = [f"megatron.dist_checkpointing_path={init_checkpoint}", "trainer.total_training_steps=2", *STEADY,
              f"data.train_files={data}", "data.pack_sequences=false", "data.shuffle=false",
              "data.micro_batch_size=1", "data.global_batch_size=8", "megatron.expert_model_parallel_size=1"]
    _, _, two = train(tmp_path / "dp2", *common, nproc=2)
    _, _, one = train(tmp_path / "dp1", *common, nproc=1)
    steps2 = [m for m in two if "loss" in m]
    steps1 = [m for m in one if "loss" in m]
    for a, b in zip(steps2, steps1):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
        assert a["response_tokens"] == b["response_tokens"]


def test_packed_and_unpacked_batches_give_the_same_loss(tmp_path, init_checkpoint):
    from launcher.recipe import load_recipe
    from tests.trainer_helpers import TINY
    from trainer.data.batches import SFTData
    from trainer.data.chat import load_tokenizer

    data = unequal_data(tmp_path / "eight.parquet")
    recipe = load_recipe(TINY, [f"data.train_files={data}", "data.shuffle=false"])
    lengths = [len(ids) for ids, _ in SFTData([str(data)], recipe.data, load_tokenizer(recipe.model.tokenizer_path),
                                             0).samples(0)]
    assert len(set(lengths[:4])) == len(set(lengths[4:])) == 1
    # four row slots, each packing one short and one long sample into a row they fill exactly,
    # so that the first step holds the eight samples and nothing of the next epoch
    common = [f"megatron.dist_checkpointing_path={init_checkpoint}", "trainer.total_training_steps=1", *STEADY,
              f"data.train_files={data}", "data.shuffle=false", "megatron.expert_model_parallel_size=1",
              f"data.max_length={lengths[0] + lengths[4]}"]
    _, _, packed = train(tmp_path / "packed", *common, "data.pack_sequences=true", "data.micro_batch_size=1",
                         "data.global_batch_size=4", nproc=1)
    _, _, unpacked = train(tmp_path / "unpacked", *common, "data.pack_sequences=false", "data.micro_batch_size=4",
                           "data.global_batch_size=8", nproc=1)
    assert losses(packed) == pytest.approx(losses(unpacked), rel=1e-5)
    assert packed[0]["response_tokens"] == unpacked[0]["response_tokens"]


def test_grouped_and_sequential_experts_write_the_same_keys_on_every_pipeline_stage(tmp_path):
    """The GPU's GroupedMLP and the CPU's SequentialMLP name every expert's tensor alike, so a
    checkpoint moves between them; on the second pipeline stage too (where megatron-core 0.16
    gave all of GroupedMLP's experts one key)."""
    import json
    import os
    import subprocess
    import sys

    from tests.trainer_helpers import write_recipe

    config = write_recipe(tmp_path, "trainer.n_gpus_per_node=2", "megatron.expert_model_parallel_size=1",
                          "megatron.pipeline_model_parallel_size=2")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(REPO / "tests" / "checkpoint_keys.py"), str(config), str(tmp_path / "keys")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        found = json.loads((tmp_path / f"keys.{rank}").read_text())
        assert found["grouped"] == found["sequential"]
        assert found["grouped optimizer"] == found["sequential optimizer"]
        assert len(set(found["grouped"])) == len(found["grouped"])
    last = json.loads((tmp_path / "keys.1").read_text())["grouped"]
    assert "decoder.layers.1.mlp.experts.experts.3.linear_fc1.weight_w" in last
    # the norms under transformer-engine's names (its layer fuses the input norm into the QKV
    # projection; an MoE layer keeps its pre-MLP norm), so TE and TE-free runs share checkpoints
    assert {"decoder.layers.1.self_attention.linear_qkv.layer_norm_weight",
            "decoder.layers.1.pre_mlp_layernorm.weight"} <= set(last)


def test_trainer_refuses_to_resume_a_run_with_another_recipe(tmp_path):
    """Where the launcher cannot see the run directory (Kubernetes), the trainer itself refuses
    a checkpoint trained with another recipe, in one line, before training a step."""
    train(tmp_path, "trainer.total_training_steps=1", "megatron.expert_model_parallel_size=1", "data.val_files=[]",
          nproc=1)
    code, log, metrics = train(tmp_path, "trainer.total_training_steps=2", "megatron.expert_model_parallel_size=1",
                               "data.val_files=[]", "data.max_length=256", nproc=1, check=False)
    assert code != 0 and "error: the run's checkpoint" in log and "data.max_length: 128 -> 256" in log
    assert [m["step"] for m in metrics if "loss" in m] == [1]


def test_checkpoint_rotation_and_a_damaged_checkpoint(tmp_path):
    """trainer.max_ckpt_to_keep keeps the newest complete checkpoints; a truncated shard in
    `latest` is refused naming the file and the checkpoint before it, which resumes when named."""
    common = ("megatron.expert_model_parallel_size=1", "data.val_files=[]", "trainer.save_freq=1",
              "trainer.max_ckpt_to_keep=2")
    train(tmp_path, "trainer.total_training_steps=4", *common, nproc=1)
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_000003", "step_000004"]
    shard = sorted((ckpts / "step_000004").glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    code, log, _ = train(tmp_path, "trainer.total_training_steps=5", *common, nproc=1, check=False)
    # the trainer exits 2 with one line (torchrun then reports its child's failure)
    assert code != 0 and f"error: checkpoint {ckpts / 'step_000004'} is damaged: {shard}: truncated" in log
    assert f"trainer.resume_from_path={ckpts / 'step_000003'}" in log
    code, log, metrics = train(tmp_path, "trainer.total_training_steps=5", *common,
                               f"trainer.resume_from_path={ckpts / 'step_000003'}", nproc=1)
    assert f"resumed from {ckpts / 'step_000003'} at step 3" in log
    assert [m["step"] for m in metrics if "loss" in m][-2:] == [4, 5]  # after steps 1 to 4 of the first run


def test_a_save_that_cannot_be_written_stops_the_job_and_keeps_the_previous_checkpoint(tmp_path):
    """A full disk: the checkpoints on a 12 MiB tmpfs that holds two of the tiny model's
    checkpoints (4.7 MiB each) but not a third (where mounting is not allowed, a file-size limit
    smaller than a shard plays it). One error line naming the checkpoint and the cause, exit
    non-zero, `latest` still the previous sound one, nothing half-written left."""
    import os
    import resource
    import subprocess
    import sys

    from tests.trainer_helpers import write_recipe
    from trainer.checkpoint import damage, latest

    ckpts = tmp_path / "disk" / "checkpoints"
    ckpts.parent.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(ckpts.parent)],
                             capture_output=True).returncode == 0
    try:
        common = ("megatron.expert_model_parallel_size=1", "data.val_files=[]", "trainer.save_freq=1",
                  f"trainer.default_local_dir={ckpts}")
        train(tmp_path, "trainer.total_training_steps=2", *common, nproc=1)
        config = write_recipe(tmp_path, "trainer.total_training_steps=4", *common, "trainer.n_gpus_per_node=1")

        def small_files():  # in the child: writes past 512 KiB fail (Python ignores SIGXFSZ)
            resource.setrlimit(resource.RLIMIT_FSIZE, (512 * 1024, 512 * 1024))

        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
                               "-m", "trainer", "--config", str(config)], cwd=tmp_path, capture_output=True, text=True,
                              timeout=300, preexec_fn=None if mounted else small_files,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
        errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error: ")]
        assert proc.returncode != 0 and len(errors) == 1, errors
        assert errors[0].startswith(f"error: could not write checkpoint {ckpts / 'step_000003'}: ")
        if mounted:  # (torch's writer says only "unexpected pos"; the free space says why)
            assert "(the file system is full: " in errors[0]
        assert errors[0].endswith(f"`latest` still names {ckpts / 'step_000002'}")
        assert latest(ckpts) == ckpts / "step_000002" and damage(ckpts / "step_000002") is None
        assert not list(ckpts.glob("*.tmp"))
    finally:
        if mounted:
            subprocess.run(["umount", str(ckpts.parent)])


def test_ranks_end_when_torchrun_is_killed(tmp_path):
    """torchrun SIGKILLed mid-training, after a checkpoint (it can stop nothing then): every
    process under it - ranks, data workers, tokenisers - ends
    within seconds instead of running on without it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.trainer_helpers import alive, descendants, training_processes, write_recipe

    config = write_recipe(tmp_path, "trainer.n_gpus_per_node=2", "trainer.total_training_steps=200",
                          "data.val_files=[]", "trainer.save_freq=1")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                             "-m", "trainer", "--config", str(config)], cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    family = []
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (tmp_path / "checkpoints" / "latest").exists():
            time.sleep(0.2)
        family = descendants(proc.pid)
        assert len(training_processes(str(config))) == 2 and len(family) > 4  # + data workers, tokenisers
        proc.kill()
        proc.wait()
        deadline = time.time() + 20
        while time.time() < deadline and alive(family):
            time.sleep(0.2)
        assert not alive(family)
    finally:
        for pid in alive(family):
            os.kill(pid, signal.SIGKILL)


def test_a_hung_rank_fails_the_job_within_the_collective_timeout(tmp_path):
    """One of two ranks stops (SIGSTOP) in the middle of training: the other waits out
    trainer.collective_timeout_s in a collective and the job ends with one line naming the step
    and the waiting rank, instead of hanging until the time limit."""
    import json
    import os
    import select
    import signal
    import subprocess
    import sys
    import time

    from tests.trainer_helpers import training_processes, write_recipe

    config = write_recipe(tmp_path, "trainer.n_gpus_per_node=2", "trainer.total_training_steps=200",
                          "trainer.collective_timeout_s=15", "data.val_files=[]", "trainer.save_freq=-1")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                             "-m", "trainer", "--config", str(config)], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    metrics = tmp_path / "metrics.jsonl"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            time.sleep(0.2)
        rank1 = [pid for pid in training_processes(str(config)) if _environ(pid).get("RANK") == "1"]
        assert len(rank1) == 1
        os.kill(rank1[0], signal.SIGSTOP)
        stopped = time.time()
        seen = b""  # read unbuffered: the line may be the last for a while
        while time.time() - stopped < 120 and b"\nerror: " not in b"\n" + seen:
            if select.select([proc.stdout], [], [], 1)[0]:
                seen += os.read(proc.stdout.fileno(), 1 << 16)
        waited = time.time() - stopped
        # torchrun would give the stopped rank 30 s to answer SIGTERM before it kills it
        os.kill(rank1[0], signal.SIGKILL)
        out = seen.decode(errors="replace") + proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert proc.returncode != 0 and waited < 15 + 45, waited
    assert len(errors) == 1 and "rank 0 waited 15 s in a collective: another rank hung or died" in errors[0]
    step = int(errors[0].split("step ")[1].split(":")[0])
    done = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if "loss" in line]
    assert step == max(done) + 1


def _environ(pid: str) -> dict:
    try:
        raw = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    except OSError:
        return {}
    return dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)


def test_alerts_reach_the_log_and_the_metrics_and_tensorboard_holds_the_metrics(tmp_path):
    """The recipe's thresholds decide: with an expert-imbalance limit barely above even routing,
    every step's log and metrics record name the layer and its most loaded expert; with the
    default limits no alert. trainer.tensorboard: the event files carry the same per-step
    scalars as metrics.jsonl."""
    _, log, metrics = train(tmp_path, "trainer.total_training_steps=3", "megatron.expert_model_parallel_size=1",
                            "data.val_files=[]", "trainer.alert_expert_imbalance=1.01", nproc=1)
    steps = [m for m in metrics if "loss" in m]
    assert all(any(": layer_0: expert " in a for a in m["alerts"]) for m in steps)
    assert "alert: step 1: layer_0: expert " in log and "x the mean of its layer's tokens" in log
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, _, quiet = train(tmp_path / "quiet", "trainer.total_training_steps=3", "megatron.expert_model_parallel_size=1",
                        "data.val_files=[]", "trainer.tensorboard=true", nproc=1)
    assert all(m["alerts"] == [] for m in quiet if "loss" in m)
    events = EventAccumulator(str(tmp_path / "quiet" / "tensorboard"))
    events.Reload()
    steps = [m for m in quiet if "loss" in m]
    for name in ("loss", "grad_norm", "lr", "tokens_per_s"):
        logged = {e.step: e.value for e in events.Scalars(name)}
        assert logged == pytest.approx({m["step"]: m[name] for m in steps}, rel=1e-6), name


def test_a2a_overlap_on_a_machine_without_gpus_is_one_line(tmp_path):
    """megatron-core's combined schedule needs CUDA streams: on CPU processes the trainer says
    so in one line and exits 2, before any step, instead of failing inside megatron-core."""
    code, log, metrics = train(tmp_path, "megatron.overlap_moe_expert_parallel_comm=true", "data.val_files=[]",
                               check=False)
    assert code != 0 and "error: megatron.overlap_moe_expert_parallel_comm=true: megatron-core's combined" in log
    # (torchrun then reports its child's failure with a traceback of its own)
    assert 'File "' + str(REPO / "trainer") not in log and (tmp_path / "BAD_INPUT").exists()
    assert not [m for m in metrics if "loss" in m]
