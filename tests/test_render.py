"""Rendered job specs: golden files for every recipe and cluster, shellcheck, the Kubeflow CRD
schema with unknown fields rejected, the Kubernetes schemas, and the operator's webhook rules."""

import copy
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from launcher.backends import backend_for
from launcher.backends.kubernetes import webhook_problems
from launcher.errors import UserError
from launcher.job import prepare_job
from tests.conftest import REPO, RECIPES, run_launcher

GOLDEN = REPO / "tests" / "golden"
CLUSTERS = sorted(p.stem for p in (REPO / "clusters").glob("*.yaml"))
RECIPE_NAMES = sorted(p.stem for p in RECIPES.glob("*.yaml"))
SCHEMAS = Path(os.environ.get("MOE_SCHEMAS_DIR", REPO / "tests" / "schemas"))  # SOURCES.md names their origin


def render(recipe, cluster, *overrides):
    job = prepare_job(str(RECIPES / f"{recipe}.yaml"), cluster, overrides)
    return job, backend_for(job.cluster).render(job)


def portable(text: str) -> str:
    """Golden files hold no machine-specific paths (the longer first: either may hold the other)."""
    for path, token in sorted([(str(REPO), "@REPO@"), (os.path.expanduser("~"), "@HOME@")], key=lambda p: -len(p[0])):
        text = text.replace(path, token)
    return text


@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # recipe paths in headers are shown relative to the working directory


@pytest.mark.parametrize("cluster", CLUSTERS)
@pytest.mark.parametrize("recipe", RECIPE_NAMES)
def test_golden(recipe, cluster):
    """Set UPDATE_GOLDEN=1 to rewrite the files after an intended change; review the diff."""
    folder = GOLDEN / f"{recipe}__{cluster}"
    try:
        _, files = render(recipe, cluster)
    except UserError as err:
        files = {"ERROR": "\n".join(err.problems) + "\n"}
    files = {name: portable(text) for name, text in files.items()}
    if os.environ.get("UPDATE_GOLDEN"):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for name, text in files.items():
            (folder / name).write_text(text)
    expected = {p.name: p.read_text() for p in folder.iterdir()}
    assert files == expected


def test_every_recipe_renders_somewhere():
    for recipe in RECIPE_NAMES:
        assert any(not (GOLDEN / f"{recipe}__{c}" / "ERROR").exists() for c in CLUSTERS), recipe


def test_rendering_is_deterministic():
    assert render("mixtral_8x7b", "k8s")[1] == render("mixtral_8x7b", "k8s")[1]
    assert render("qwen3_235b_a22b", "slurm")[1] == render("qwen3_235b_a22b", "slurm")[1]


def rendered_scripts():
    for folder in sorted(GOLDEN.iterdir()):
        for path in folder.glob("*.s*"):
            if path.suffix in (".sbatch", ".sh"):
                yield path


@pytest.mark.skipif(not shutil.which("shellcheck"), reason="shellcheck (Debian package) is not installed")
def test_scripts_pass_bash_n_and_shellcheck():
    scripts = list(rendered_scripts())
    assert len(scripts) >= 8
    for path in scripts:
        subprocess.run(["bash", "-n", str(path)], check=True)
    result = subprocess.run(["shellcheck", "--severity=info", *map(str, scripts)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_hostile_values_reach_the_shell_intact(tmp_path):
    nasty = "a b'c\"d $(touch /tmp/pwned) `id` ; \\ end"
    _, files = render("tiny_moe", "slurm-local", "job.env.NASTY=" + json.dumps(nasty))
    script = files["tiny_moe.sbatch"]
    exports = "\n".join(line for line in script.splitlines() if line.startswith("export "))
    out = subprocess.run(["bash", "-c", exports + '\nprintf %s "$NASTY"'], capture_output=True, text=True)
    assert out.stdout == nasty


def test_sbatch_lines_refuse_unsafe_words(tmp_path):
    profile = tmp_path / "odd.yaml"
    profile.write_text((REPO / "clusters/slurm-local.yaml").read_text().replace("/tmp/moe-runs", "/tmp/my runs"))
    with pytest.raises(UserError, match="cannot be written on an #SBATCH line"):
        render("tiny_moe", str(profile))


def test_slurm_options_follow_the_slurm_version():
    _, old = render("mixtral_8x7b", "slurm")  # 23.11
    _, new = render("mixtral_8x7b", "slurm-h200")  # 24.11
    assert "--oom-kill-step" not in old["mixtral_8x7b.sbatch"]
    assert "--oom-kill-step=1" in new["mixtral_8x7b.sbatch"]
    for text in (old["mixtral_8x7b.sbatch"], new["mixtral_8x7b.sbatch"]):
        assert "--kill-on-bad-exit=1" in text and "--rdzv-backend=c10d" in text
        assert "#SBATCH --open-mode=append" in text and "SLURM_RESTART_COUNT" in text


def test_resolved_recipe_travels_with_the_job():
    job, files = render("qwen3_235b_a22b", "slurm")
    script = files["qwen3_235b_a22b.sbatch"]
    embedded = script.split("<<'MOE_LAUNCHER_RECIPE_END'\n", 1)[1].split("MOE_LAUNCHER_RECIPE_END\n", 1)[0]
    assert embedded == files["recipe.yaml"]
    resolved = yaml.safe_load(embedded)
    assert resolved["megatron"]["expert_tensor_parallel_size"] == 1
    assert resolved["megatron"]["num_layers_in_first_pipeline_stage"] == 11
    assert resolved["trainer"]["default_local_dir"] == "/shared/moe-runs/qwen3_235b_a22b/checkpoints"


# Kubernetes

def strict(schema):
    """The CRD schema with unknown fields rejected, as `kubectl apply --validate=strict` does."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node and "additionalProperties" not in node \
                    and not node.get("x-kubernetes-preserve-unknown-fields"):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


def crd_schema(file: str, version: str) -> dict:
    """A CRD's resource schema, with unknown fields rejected (the API server prunes them)."""
    crd = yaml.safe_load((SCHEMAS / file).read_text())
    (found,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return strict(found["schema"]["openAPIV3Schema"])


@pytest.fixture(scope="module")
def pytorchjob_schema():
    return crd_schema("kubeflow.org_pytorchjobs.yaml", "v1")


def k8s_manifests():
    for folder in sorted(GOLDEN.iterdir()):
        if (folder / "pytorchjob.yaml").exists():
            yield yaml.safe_load((folder / "configmap.yaml").read_text()), \
                yaml.safe_load((folder / "pytorchjob.yaml").read_text())


def test_pytorchjobs_validate_against_the_crd(pytorchjob_schema):
    import jsonschema

    manifests = list(k8s_manifests())
    assert len(manifests) >= 4
    for _, job in manifests:
        jsonschema.validate(job, pytorchjob_schema)
        assert webhook_problems(job) == []


def test_the_strict_crd_schema_rejects_an_unknown_field(pytorchjob_schema):
    import jsonschema

    _, job = next(k8s_manifests())
    job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["gpus"] = 8
    with pytest.raises(jsonschema.ValidationError, match="gpus"):
        jsonschema.validate(job, pytorchjob_schema)


def test_manifests_validate_against_kubernetes_schemas():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for configmap, job in k8s_manifests():
        kubernetes_validate.validate(configmap, "1.33.0", strict=True)
        for replica in job["spec"]["pytorchReplicaSpecs"].values():
            template = {"apiVersion": "v1", "kind": "PodTemplate",
                        "metadata": {"name": job["metadata"]["name"]}, "template": replica["template"]}
            kubernetes_validate.validate(template, "1.33.0", strict=True)
        for name in (job["metadata"]["name"], configmap["metadata"]["name"]):
            assert len(name) <= 63 and name[0].isalpha() and all(c.isalnum() or c == "-" for c in name)


def test_webhook_rules():
    _, files = render("mixtral_8x7b", "k8s")
    job = yaml.safe_load(files["pytorchjob.yaml"])
    assert job["spec"]["nprocPerNode"] == "8"
    assert job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1
    bad = copy.deepcopy(job)
    bad["spec"]["nprocPerNode"] = 8
    bad["spec"]["pytorchReplicaSpecs"]["Chief"] = bad["spec"]["pytorchReplicaSpecs"].pop("Worker")
    bad["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] = 2
    bad["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["name"] = "trainer"
    assert len(webhook_problems(bad)) == 4


def trainjobs():
    for folder in sorted(GOLDEN.iterdir()):
        if (folder / "trainjob.yaml").exists():
            yield yaml.safe_load((folder / "trainjob.yaml").read_text())


def test_trainjobs_validate_against_the_crd_the_webhook_and_kubernetes_schemas():
    """TrainJob (Trainer v2.0): its CRD with unknown fields rejected, the webhook's rules, and
    the pod it becomes (the runtime's `node` container with the trainer fields and overrides)
    against the Kubernetes schemas."""
    import jsonschema

    from launcher.backends.trainjob import webhook_problems as trainjob_problems

    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    schema = crd_schema("trainer.kubeflow.org_trainjobs.yaml", "v1alpha1")
    jobs = list(trainjobs())
    assert len(jobs) >= 4
    for job in jobs:
        jsonschema.validate(job, schema)
        assert trainjob_problems(job) == []
        trainer, (override,) = job["spec"]["trainer"], job["spec"]["podSpecOverrides"]
        container = {"name": "node", "image": trainer["image"], "command": trainer["command"], "env": trainer["env"],
                     "resources": trainer["resourcesPerNode"], "volumeMounts": override["containers"][0]["volumeMounts"]}
        pod_spec = {"containers": [container], "volumes": override["volumes"]}
        pod_spec.update({k: override[k] for k in ("nodeSelector", "tolerations") if k in override})
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "node-0"},
                                      "spec": pod_spec}, "1.33.0", strict=True)
    bad = copy.deepcopy(jobs[0])
    bad["spec"]["trainer"]["gpus"] = 8
    with pytest.raises(jsonschema.ValidationError, match="gpus"):
        jsonschema.validate(bad, schema)
    bad = copy.deepcopy(jobs[0])
    override = bad["spec"]["podSpecOverrides"][0]
    override["targetJobs"] = [{"name": "launcher"}]
    override["containers"][0]["env"] = [{"name": "A", "value": "1"}]
    assert len(trainjob_problems(bad)) == 2


def test_trainjob_profile_refuses_what_a_trainjob_cannot_carry(tmp_path):
    profile = tmp_path / "tj.yaml"
    profile.write_text((REPO / "clusters" / "k8s-trainjob.yaml").read_text() + "  priority_class: high\n")
    rc, out, err = run_launcher("render", RECIPES / "mixtral_8x7b.yaml", "--cluster", profile)
    assert rc == 2 and out == "" and "kubernetes.priority_class" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("resolves", [True, False])
def test_workers_wait_for_the_master_name_then_start(resolves):
    """The job's command waits (bounded, saying so) until the first node's name resolves, then
    runs torchrun with its arguments untouched."""
    _, files = render("mixtral_8x7b", "k8s")
    command = yaml.safe_load(files["pytorchjob.yaml"])["spec"]["pytorchReplicaSpecs"]["Worker"]["template"][
        "spec"]["containers"][0]["command"]
    assert command[:2] == ["sh", "-c"] and command[4:7] == ["python", "-m", "torch.distributed.run"]
    stub = [*command[:4], "printf", "%s|", "started", "it's $(not run)"]
    env = {"PATH": os.environ["PATH"], "PET_MASTER_ADDR": "localhost" if resolves else "nowhere.invalid",
           "MOE_MASTER_WAIT_S": "0" if not resolves else "300"}
    proc = subprocess.run(stub, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout == "started|it's $(not run)|"
    if resolves:
        assert proc.stderr == ""
    else:
        assert "nowhere.invalid does not resolve after 0 s; starting anyway" in proc.stderr


@pytest.mark.parametrize("cluster,kind", [("k8s", "pytorchjob"), ("k8s-trainjob", "trainjob")])
def test_rendered_folder_applies_configmap_first(tmp_path, cluster, kind):
    """`kubectl apply -f DIR` takes files in name order: the ConfigMap the job mounts comes first."""
    rc, out, err = run_launcher("render", RECIPES / "qwen2_moe.yaml", "--cluster", cluster, "-o", tmp_path)
    assert rc == 0 and sorted(p.name for p in tmp_path.iterdir()) == ["configmap.yaml", f"{kind}.yaml"]
    job = yaml.safe_load((tmp_path / f"{kind}.yaml").read_text())
    assert "qwen2-moe-recipe" in json.dumps(job)


def test_render_without_output_prints_specs_for_kubectl():
    rc, out, err = run_launcher("render", RECIPES / "mixtral_8x7b.yaml", "--cluster", "k8s")
    docs = list(yaml.safe_load_all(out))
    assert rc == 0 and [d["kind"] for d in docs] == ["ConfigMap", "PyTorchJob"]
    rc, out, err = run_launcher("render", RECIPES / "mixtral_8x7b.yaml", "--cluster", "k8s-trainjob")
    assert rc == 0 and [d["kind"] for d in yaml.safe_load_all(out)] == ["ConfigMap", "TrainJob"]


def test_render_writes_files_and_prints_their_paths(tmp_path):
    rc, out, err = run_launcher("render", RECIPES / "tiny_moe.yaml", "--cluster", "slurm-local", "-o", tmp_path)
    assert rc == 0 and out.split() == [str(tmp_path / "tiny_moe.sbatch"), str(tmp_path / "recipe.yaml")]
    assert os.access(tmp_path / "tiny_moe.sbatch", os.X_OK)


def test_failed_render_writes_nothing(tmp_path):
    out_dir = tmp_path / "out"
    rc, out, err = run_launcher("render", RECIPES / "deepseek_v3.yaml", "--cluster", "slurm", "-o", out_dir)
    assert rc == 2 and not out_dir.exists() and out == ""
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_submit_dry_run_prints_what_it_would_submit():
    rc, out, err = run_launcher("submit", RECIPES / "mixtral_8x7b.yaml", "--cluster", "slurm", "--dry-run")
    assert rc == 0 and out.startswith("# dry run: would run `sbatch mixtral_8x7b.sbatch`")
    assert "#SBATCH --nodes=2" in out
