"""The Kubernetes backend's client path, against a FAKE API server (tests/k8s_fake.py) that
validates every body against the Kubeflow CRD schemas and the Kubernetes schemas; every test
runs for both job kinds (PyTorchJob with the `k8s` profile, TrainJob with `k8s-trainjob`)."""

import json

import pytest

from tests.conftest import RECIPES, run_launcher
from tests.k8s_fake import FakeKubernetes
from tests.test_render import crd_schema


@pytest.fixture(params=["k8s", "k8s-trainjob"])
def fake(tmp_path, request):
    with FakeKubernetes({"pytorchjobs": crd_schema("kubeflow.org_pytorchjobs.yaml", "v1"),
                         "trainjobs": crd_schema("trainer.kubeflow.org_trainjobs.yaml", "v1alpha1")}) as server:
        kubeconfig = tmp_path / "kubeconfig"
        server.kubeconfig(kubeconfig)
        profile = tmp_path / "k8s.yaml"
        text = (RECIPES.parent / "clusters" / f"{request.param}.yaml").read_text()
        profile.write_text(text.replace("kubernetes:\n", f"kubernetes:\n  kubeconfig: {kubeconfig}\n", 1))
        yield server, str(profile), {"MOE_LAUNCHER_HOME": str(tmp_path / "home")}


def test_submit_status_logs_cancel(fake):
    server, profile, env = fake
    rc, out, err = run_launcher("submit", RECIPES / "mixtral_8x7b.yaml", "--cluster", profile, "--json", env=env)
    assert rc == 0, err
    job_id = json.loads(out.splitlines()[-1])["job_id"]
    assert job_id == "k8s/training/mixtral-8x7b"
    assert ("training", "mixtral-8x7b") in server.jobs and ("training", "mixtral-8x7b-recipe") in server.configmaps
    kind = server.jobs[("training", "mixtral-8x7b")]["kind"]
    assert kind == ("TrainJob" if "trainjob" in open(profile).read() else "PyTorchJob")
    assert json.loads(run_launcher("status", job_id, "--json", env=env)[1])["state"] == "PENDING"
    server.run_job("training", "mixtral-8x7b", "Running", log="step 1/10 loss 2.3\n")
    status = json.loads(run_launcher("status", job_id, "--json", env=env)[1])
    assert status["state"] == "RUNNING" and status["nodes"] == "gpu-node-1"
    assert "step 1/10 loss 2.3" in run_launcher("logs", job_id, env=env)[1]
    rc, out, _ = run_launcher("cancel", job_id, env=env)
    assert rc == 0 and not server.jobs and not server.configmaps
    assert json.loads(run_launcher("status", job_id, "--json", env=env)[1])["state"] == "CANCELLED"


def test_failed_job_reports_its_exit_code(fake):
    server, profile, env = fake
    rc, out, _ = run_launcher("submit", RECIPES / "mixtral_8x7b.yaml", "--cluster", profile, "--json", env=env)
    job_id = json.loads(out.splitlines()[-1])["job_id"]
    server.run_job("training", "mixtral-8x7b", "Failed", exit_code=3, log="error: something broke\n")
    status = json.loads(run_launcher("status", job_id, "--json", env=env)[1])
    assert (status["state"], status["exit_code"]) == ("FAILED", 3)


def test_rejected_job_records_nothing_and_leaves_nothing(fake):
    server, profile, env = fake
    run_launcher("submit", RECIPES / "mixtral_8x7b.yaml", "--cluster", profile, env=env)
    server.configmaps.clear()  # the PyTorchJob already exists: the second create is refused
    rc, out, err = run_launcher("submit", RECIPES / "mixtral_8x7b.yaml", "--cluster", profile, env=env)
    assert rc == 2 and "already exists" in err and "Traceback" not in err
    assert not server.configmaps  # the ConfigMap of the refused submit was deleted again
    assert len([line for line in run_launcher("list", env=env)[1].splitlines()[1:] if line]) == 1


def test_unreadable_kubeconfig_is_one_line(fake, tmp_path):
    _, profile, env = fake
    broken = tmp_path / "broken.yaml"
    broken.write_text((tmp_path / "k8s.yaml").read_text().replace(str(tmp_path / "kubeconfig"), "/nonexistent/config"))
    rc, _, err = run_launcher("submit", RECIPES / "mixtral_8x7b.yaml", "--cluster", broken, env=env)
    assert rc == 2 and err.startswith(f"error: {broken}: kubernetes.kubeconfig: cannot use /nonexistent/config")


def test_following_the_log_across_a_pod_restart(fake, monkeypatch):
    """`launcher logs -f` keeps following when the first node's pod restarts: the new attempt's
    log from its start, after a line saying so, then the end when the job ends."""
    from launcher.backends import backend_for
    from launcher.cluster import load_cluster
    from launcher.store import JobStore

    server, profile, env = fake
    rc, out, _ = run_launcher("submit", RECIPES / "mixtral_8x7b.yaml", "--cluster", profile, "--json", env=env)
    job_id = json.loads(out.splitlines()[-1])["job_id"]
    monkeypatch.setenv("MOE_LAUNCHER_HOME", env["MOE_LAUNCHER_HOME"])
    record = JobStore().get(job_id)
    server.run_job("training", "mixtral-8x7b", "Running", log="attempt 1: step 1\nattempt 1: step 2\n")
    follow = backend_for(load_cluster(profile)).logs(record, follow=True, poll_s=0.05)
    assert next(follow) == "attempt 1: step 1\nattempt 1: step 2\n"
    server.run_job("training", "mixtral-8x7b", "Running", log="attempt 2: resumed\n")  # a new container
    assert next(follow).endswith("restarted; its log from the start ---\n")
    assert next(follow) == "attempt 2: resumed\n"
    server.run_job("training", "mixtral-8x7b", "Succeeded", exit_code=0, log="attempt 2: resumed\ndone\n")
    assert "".join(follow) == "done\n"
