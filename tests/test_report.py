"""`launcher report` alerts on what engineers watch MoE runs for: a loss spike, a step whose
loss is not finite, and an expert layer whose most loaded expert takes far more than its share."""

import json

from tests.conftest import run_launcher

pytest = __import__("pytest")
pytest.importorskip("matplotlib")


def test_alerts_name_the_spike_the_nan_and_the_overloaded_layer(tmp_path):
    records = []
    for step in range(1, 31):
        loss = 2.0 - step * 0.01
        if step == 20:
            loss = 9.0  # a spike
        if step == 25:
            loss = float("nan")
        records.append({"step": step, "loss": loss, "lr": 1e-4, "grad_norm": 1.0, "tokens_per_s": 1000.0,
                        "mfu": None, "moe_aux_loss": 0.1, "job_id": None, "expert_parallel_load": 1.1 + step % 3 / 10,
                        "tokens_per_expert": {"layer_0": [25, 25, 25, 25], "layer_1": [93, 1, 1, 1, 1, 1, 1, 1]}})
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    rc, out, err = run_launcher("report", tmp_path, timeout=120)
    assert rc == 0, err
    alerts = [line for line in err.splitlines() if line.startswith("alert: ")]
    assert any("step 20: loss spike" in a for a in alerts)
    assert any("step 25: loss nan" in a and "not finite" in a for a in alerts)
    assert any(a == "alert: step 1: layer_1: expert 0 took 7.4 x the mean of its layer's tokens" for a in alerts)
    assert not any("layer_0" in a for a in alerts)
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "| layer_1 | expert 0 (2,790) | expert 1 (30) | 7.44 |" in summary and "## Alerts" in summary
    assert "| expert-parallel load, busiest rank / mean (median) | 1.20 |" in summary


def test_a_folder_without_metrics_is_one_line(tmp_path):
    rc, out, err = run_launcher("report", tmp_path)
    assert rc == 2 and err.strip() == f"error: {tmp_path / 'metrics.jsonl'}: no metrics yet; the job writes them from its first step"
