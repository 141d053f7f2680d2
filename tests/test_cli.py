"""The command line as users meet it: exit codes, no tracebacks, speed, no torch, the wheel."""

import json
import subprocess
import sys
import time

from tests.conftest import REPO, RECIPES, run_launcher

# Makes `import torch` and `import megatron` fail, as on a laptop without them.
NO_TORCH = ("import sys; sys.modules.update(torch=None, megatron=None, transformer_engine=None); "
            "from launcher.cli import main; rc = main(sys.argv[1:]); "
            "assert not any(m.split('.')[0] in ('torch', 'megatron', 'kubernetes') "
            "for m in sys.modules if sys.modules[m] is not None), 'heavy import'; raise SystemExit(rc)")


def test_render_runs_without_torch_and_fast(tmp_path):
    args = ["render", str(RECIPES / "qwen3_235b_a22b.yaml"), "--cluster", "k8s", "-o", str(tmp_path)]
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", NO_TORCH, *args], cwd=REPO, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "pytorchjob.yaml").exists()
    assert elapsed < 1.0, f"launcher render took {elapsed:.2f}s"


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {path: x\n")
    cases = [
        ["validate", bad, "--cluster", "slurm"],
        ["validate", RECIPES / "mixtral_8x7b.yaml", "--cluster", "nowhere"],
        ["validate", tmp_path / "missing.yaml", "--cluster", "slurm"],
        ["plan", RECIPES / "mixtral_8x7b.yaml", "--cluster", "slurm", "megatron.expert_model_parallel_size=3"],
        ["render", RECIPES / "mixtral_8x7b.yaml", "--cluster", "slurm", "not-an-override"],
        ["validate", RECIPES / "mixtral_8x7b.yaml", "--cluster", "slurm", "model.path=/nonexistent"],
    ]
    for args in cases:
        rc, out, err = run_launcher(*args)
        assert rc == 2, (args, err)
        assert "Traceback" not in err
        assert err.startswith(("error: ", "usage: ")), err
    rc, _, err = run_launcher("validate", RECIPES / "mixtral_8x7b.yaml", "--cluster", "slurm",
                              "model.path=/nonexistent")
    assert err.strip() == (f"error: {RECIPES / 'mixtral_8x7b.yaml'}: model.path: no config.json at "
                           "/nonexistent/config.json; point model.path at a Hugging Face model folder")


def test_cluster_profile_problems_name_the_file(tmp_path):
    profile = tmp_path / "mine.yaml"
    profile.write_text("backend: slurm\ngpus_per_node: 8\nslurm:\n  partion: gpu\n")
    rc, _, err = run_launcher("validate", RECIPES / "mixtral_8x7b.yaml", "--cluster", profile)
    assert rc == 2 and err.strip() == f"error: {profile}:4: slurm.partion: unknown key (did you mean 'partition'?)"


def test_overrides_before_and_after_options():
    rc, out, _ = run_launcher("plan", RECIPES / "qwen3_235b_a22b.yaml", "megatron.expert_model_parallel_size=2",
                              "--cluster", "slurm", "megatron.tensor_model_parallel_size=2", "--json")
    plan = json.loads(out)
    assert rc == 0 and (plan["tp"], plan["ep"], plan["dp"]) == (2, 2, 2)


def test_installed_wheel_finds_templates_and_profiles(tmp_path):
    """Build the wheel, install it alone into a folder, and render from outside the checkout."""
    dist, target = tmp_path / "dist", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(dist), str(REPO)], check=True)
    (wheel,) = dist.glob("moe_launcher-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True)
    recipe = target / "launcher" / "recipes" / "mixtral_8x7b.yaml"
    assert recipe.exists() and (target / "launcher" / "recipes" / "models" / "mixtral_8x7b" / "config.json").exists()
    for module in ("trainer/model/build.py", "trainer/data/parquet.py", "trainer/convert/families/deepseek_v3.py"):
        assert (target / module).exists(), module  # what the jobs run, and `launcher convert`
    proc = subprocess.run([sys.executable, "-m", "launcher", "render", str(recipe), "--cluster", "slurm"],
                          cwd=tmp_path, env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "#SBATCH --nodes=2" in proc.stdout


def test_cluster_profile_missing_field(tmp_path):
    profile = tmp_path / "nobackend.yaml"
    profile.write_text("gpus_per_node: 8\n")
    rc, _, err = run_launcher("validate", RECIPES / "mixtral_8x7b.yaml", "--cluster", profile)
    assert rc == 2 and err.strip() == f"error: {profile}: backend: required key is missing"
