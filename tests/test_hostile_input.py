"""Arbitrary strings in the recipe and profile fields that reach a shell or a manifest: the
scripts parse, running them runs none of the text, and every value arrives byte for byte."""

import contextlib
import io
import json
import subprocess

import pytest
import yaml
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from launcher.backends import backend_for
from launcher.errors import UserError
from launcher.job import prepare_job
from tests.conftest import REPO, RECIPES

# Shell and YAML metacharacters, a command that would leave a trace if anything ran it,
# newlines, quotes, unicode; no NUL (no environment variable can hold one).
PIECES = ["$(touch CANARY)", "`touch CANARY`", "'", '"', "\\", "$HOME", "${X:-y}", ";", "&&", "|", "\n", "\r",
          "\t", " ", "#", "*", "~", "!", "MOE_LAUNCHER_RECIPE_END", "é", "漢", "\u2028", "-e", "--", "{{ x }}", "%j"]
VALUES = st.lists(st.one_of(st.sampled_from(PIECES), st.text(st.characters(blacklist_categories=("Cs",),
                                                                             blacklist_characters="\x00"),
                                                              max_size=8)), max_size=12).map("".join)

STUB = """#!/bin/bash
# stands in for srun, scontrol and python: records what the job handed it
case "$(basename "$0")" in
  scontrol) echo localhost ;;
  *) printf %s "$HOSTILE" > "$OUT/received" ;;
esac
"""


def as_written(data) -> str:
    """YAML as a user writes it, unicode raw, unless PyYAML would write a line break such as
    U+0085 raw inside a quoted scalar, where YAML reads it as a fold (a space): then escaped, so
    the file holds the value the test expects to arrive."""
    text = yaml.safe_dump(data, allow_unicode=True)
    return text if yaml.safe_load(text) == data else yaml.safe_dump(data)


def write_inputs(tmp_path, value):
    recipe = yaml.safe_load((RECIPES / "tiny_moe.yaml").read_text())
    recipe["model"]["path"] = str(RECIPES / "models" / "tiny_moe")
    recipe.setdefault("job", {})["env"] = {"HOSTILE": value, "OUT": str(tmp_path)}
    recipe["job"]["image"] = "registry.example/img:1" + value.replace("\n", "")
    recipe["data"]["train_files"] = [str(RECIPES / "data" / "tiny_sft.parquet"), value or "x"]
    recipe["notes"] = value
    path = tmp_path / "hostile.yaml"
    path.write_text(as_written(recipe))
    profiles = {}
    for name in ("local", "slurm-local", "k8s"):
        profile = yaml.safe_load((REPO / "clusters" / f"{name}.yaml").read_text())
        profile["python"] = str(tmp_path / "python")
        profile.setdefault("env", {})["HOSTILE_PROFILE"] = value
        if name != "k8s":
            profile["run_root"] = str(tmp_path / "runs")
        profiles[name] = tmp_path / f"{name}.yaml"
        profiles[name].write_text(as_written(profile))
    return path, profiles


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=VALUES)
@example(value="\x85")  # NEL: a line break to YAML (once lost by the test's own input file)
def test_hostile_values_run_nothing_and_arrive_intact(tmp_path_factory, value):
    tmp_path = tmp_path_factory.mktemp("hostile")
    for tool in ("python", "srun", "scontrol"):
        (tmp_path / tool).write_text(STUB)
        (tmp_path / tool).chmod(0o755)
    recipe, profiles = write_inputs(tmp_path, value)
    for cluster, profile in profiles.items():
        try:
            job = prepare_job(str(recipe), str(profile))
            files = backend_for(job.cluster).render(job)
        except UserError as err:  # refused with a message is fine (a value a spec cannot hold)
            event(f"{cluster}: refused")
            assert err.problems
            continue
        event(f"{cluster}: rendered")
        if cluster == "k8s":
            manifest = yaml.safe_load(files["pytorchjob.yaml"])
            env = manifest["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["env"]
            assert {"name": "HOSTILE", "value": value} in env
            assert {"name": "HOSTILE_PROFILE", "value": value} in env
            assert yaml.safe_load(yaml.safe_load(files["configmap.yaml"])["data"]["recipe.yaml"])["notes"] == value
            continue
        (script_name,) = [n for n in files if n.endswith((".sh", ".sbatch"))]
        script = tmp_path / script_name
        script.write_text(files[script_name])
        assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
        received = tmp_path / "received"
        received.unlink(missing_ok=True)
        env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "localhost",
               "SLURM_JOB_NUM_NODES": "1", "HOME": str(tmp_path)}
        subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, timeout=60)
        assert received.read_bytes() == value.encode(), cluster
        assert not (tmp_path / "CANARY").exists() and not (tmp_path / "runs" / "CANARY").exists()
        resolved = yaml.safe_load((tmp_path / "runs" / job.name / "recipe.yaml").read_text())
        assert resolved["notes"] == value and resolved["job"]["env"]["HOSTILE"] == value


@pytest.mark.parametrize("loader", ["recipe", "profile", "parquet"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=400))
def test_loaders_given_random_bytes_answer_in_one_line(tmp_path_factory, loader, data):
    """Random bytes, truncated files, wrong types: `launcher validate` (and `data check` for
    parquet) exit 2 with `error:` lines only, never a traceback."""
    from launcher.cli import main  # in process: the same code as the command, faster

    tmp_path = tmp_path_factory.mktemp("fuzz")
    bad = tmp_path / ("bad.yaml" if loader != "parquet" else "bad.parquet")
    if loader == "parquet":  # a real parquet file's head with random bytes after it
        bad.write_bytes((RECIPES / "data" / "tiny_sft.parquet").read_bytes()[:200] + data)
        argv = ["data", "check", str(RECIPES / "tiny_moe.yaml"), f"data.train_files=[{json.dumps(str(bad))}]"]
    elif loader == "recipe":
        bad.write_bytes(data)
        argv = ["validate", str(bad), "--cluster", "local"]
    else:
        bad.write_bytes(data)
        argv = ["validate", str(RECIPES / "tiny_moe.yaml"), "--cluster", str(bad)]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    lines = [line for line in err.getvalue().splitlines() if line]
    assert code in (0, 2)
    assert all(line.startswith("error: ") for line in lines), lines
    if code == 2:
        assert lines
