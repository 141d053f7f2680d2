"""Secrets are referenced, never copied: no rendered file, log, run directory or job-store row
holds a secret's value, and the job still receives it."""

import hashlib
import json

import jsonschema
import pytest
import yaml

from tests.conftest import REPO, RECIPES, run_launcher
from tests.test_render import crd_schema

TOKEN = "hf_Sekrit-value-0123456789"  # what a user's HF_TOKEN holds


def k8s_profile(tmp_path, api="pytorchjob"):
    base = yaml.safe_load((REPO / "clusters" / ("k8s.yaml" if api == "pytorchjob" else "k8s-trainjob.yaml")).read_text())
    base["kubernetes"]["secrets"] = {"HF_TOKEN": {"secret": "hf", "key": "token"},
                                     "WANDB_API_KEY": {"secret": "wandb", "key": "api-key"}}
    if api == "pytorchjob":
        base["kubernetes"]["image_pull_secrets"] = ["regcred"]
    path = tmp_path / f"k8s-{api}.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


def all_text(folder):
    return "".join(p.read_text(errors="replace") for p in folder.rglob("*") if p.is_file())


def test_rendered_specs_reference_secrets_and_hold_no_values(tmp_path):
    env = {"HF_TOKEN": TOKEN, "WANDB_API_KEY": TOKEN + "-wandb"}
    for cluster in ["slurm", "local", str(k8s_profile(tmp_path)), str(k8s_profile(tmp_path, "trainjob"))]:
        out = tmp_path / "spec" / cluster.replace("/", "_")
        rc, _, err = run_launcher("render", RECIPES / "tiny_moe.yaml", "--cluster", cluster, "-o", out,
                                  "job.secrets=[HF_TOKEN]", env=env)
        assert rc == 0, err
        text = all_text(out)
        assert TOKEN not in text and "HF_TOKEN" in text
    job = yaml.safe_load((tmp_path / "spec" / str(k8s_profile(tmp_path)).replace("/", "_") / "pytorchjob.yaml").read_text())
    pod = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    env_entries = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env_entries["HF_TOKEN"] == {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}
    assert env_entries["WANDB_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "wandb", "key": "api-key"}
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    jsonschema.validate(job, crd_schema("kubeflow.org_pytorchjobs.yaml", "v1"))
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"},
                                  "template": job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]},
                                 "1.33.0", strict=True)


def test_a_local_job_receives_the_secret_and_nothing_keeps_it(tmp_path):
    stand_in = tmp_path / "python.sh"  # stands in for the trainer: says what it received, by digest
    stand_in.write_text('#!/bin/bash\necho "HF_TOKEN digest $(printf %s "$HF_TOKEN" | sha256sum | cut -c1-16)"\n')
    stand_in.chmod(0o755)
    profile = tmp_path / "local.yaml"
    profile.write_text((REPO / "clusters" / "local.yaml").read_text()
                       .replace("run_root: ~/moe-runs", f"run_root: {tmp_path / 'runs'}")
                       .replace("python: python3", f"python: {stand_in}"))
    env = {"HF_TOKEN": TOKEN, "MOE_LAUNCHER_HOME": str(tmp_path / "home")}
    rc, out, err = run_launcher("submit", RECIPES / "tiny_moe.yaml", "--cluster", profile, "--wait", "--json",
                                "job.secrets=[HF_TOKEN]", env=env, timeout=120)
    assert rc == 0, out + err
    job_id = json.loads(out.splitlines()[-1])["job_id"]
    rc, log, _ = run_launcher("logs", job_id, env=env)
    assert f"HF_TOKEN digest {hashlib.sha256(TOKEN.encode()).hexdigest()[:16]}" in log
    assert TOKEN not in log + out + err
    assert TOKEN.encode() not in (tmp_path / "home" / "jobs.sqlite").read_bytes()
    assert TOKEN not in all_text(tmp_path / "runs")


def test_secret_values_in_recipe_or_profile_env_are_refused(tmp_path):
    rc, _, err = run_launcher("validate", RECIPES / "tiny_moe.yaml", "--cluster", "local", f"job.env.HF_TOKEN={TOKEN}")
    assert rc == 2 and "job.env.HF_TOKEN: looks like a secret" in err and "job.secrets" in err
    assert TOKEN not in err
    profile = tmp_path / "leaky.yaml"
    profile.write_text((REPO / "clusters" / "slurm.yaml").read_text().replace(
        "env:\n", f"env:\n  WANDB_API_KEY: {TOKEN}\n", 1))
    rc, _, err = run_launcher("validate", RECIPES / "tiny_moe.yaml", "--cluster", profile)
    assert rc == 2 and "env.WANDB_API_KEY: looks like a secret" in err and TOKEN not in err


def test_a_secret_missing_where_it_comes_from_is_one_line(tmp_path):
    profile = tmp_path / "local.yaml"
    profile.write_text((REPO / "clusters" / "local.yaml").read_text()
                       .replace("run_root: ~/moe-runs", f"run_root: {tmp_path / 'runs'}"))
    rc, out, err = run_launcher("submit", RECIPES / "tiny_moe.yaml", "--cluster", profile,
                                "job.secrets=[MOE_TEST_NEVER_SET_TOKEN]", env={"MOE_LAUNCHER_HOME": str(tmp_path / "h")})
    assert rc == 2 and err.count("\n") == 1
    assert "job.secrets: MOE_TEST_NEVER_SET_TOKEN not set in this environment" in err
    assert not (tmp_path / "runs").exists()  # nothing half-written
    rc, _, err = run_launcher("render", RECIPES / "tiny_moe.yaml", "--cluster", "k8s", "job.secrets=[HF_TOKEN]")
    assert rc == 2 and "no kubernetes.secrets entry" in err
