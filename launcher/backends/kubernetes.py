"""Kubernetes: a Kubeflow PyTorchJob (kubeflow.org/v1) and a ConfigMap holding the recipe.

Manifests are built as plain data and written as YAML; `kubectl apply -f DIR` applies them.
The operator's admission webhook enforces rules its CRD schema lacks; `webhook_problems`
checks them here so a bad manifest fails at render time, not in the cluster.
"""

from __future__ import annotations

import yaml

from launcher.backends.base import Backend
from launcher.errors import UserError
from launcher.job import Job
from launcher.recipe import time_limit_seconds
from launcher.render import rfc1123_name

RECIPE_MOUNT = "/etc/moe-launcher"
# Pods are named <job>-worker-<index>; keep room for that inside 63 characters.
MAX_JOB_NAME = 40


def webhook_problems(job: dict) -> list[str]:
    """The training operator's PyTorchJob validation rules that the CRD schema does not carry."""
    problems = []
    spec = job.get("spec", {})
    replicas = spec.get("pytorchReplicaSpecs") or {}
    for kind in replicas:
        if kind not in ("Master", "Worker"):
            problems.append(f"replica type {kind}: only Master and Worker are allowed")
    master = replicas.get("Master")
    if master is None or master.get("replicas", 1) != 1:
        problems.append("exactly one Master replica is required")
    for kind, rspec in replicas.items():
        containers = rspec.get("template", {}).get("spec", {}).get("containers", [])
        pytorch = [c for c in containers if c.get("name") == "pytorch"]
        if not pytorch:
            problems.append(f"{kind}: the training container must be named 'pytorch'")
        elif not pytorch[0].get("image"):
            problems.append(f"{kind}: the 'pytorch' container needs an image")
    nproc = spec.get("nprocPerNode")
    if nproc is not None and not isinstance(nproc, str):
        problems.append(f"spec.nprocPerNode must be a string, found {nproc!r}")
    return problems


class KubernetesBackend(Backend):
    def names(self, job: Job) -> tuple[str, str]:
        name = rfc1123_name(job.name, MAX_JOB_NAME)
        return name, f"{name}-recipe"

    def manifests(self, job: Job) -> tuple[dict, dict]:
        k8s = self.cluster.kubernetes
        name, configmap_name = self.names(job)
        labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/managed-by": "moe-launcher"}
        configmap = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": configmap_name, "namespace": k8s.namespace, "labels": labels},
            "data": {"recipe.yaml": job.recipe_yaml},
        }
        gpus = job.nproc_per_node
        command = [job.cluster.python, "-m", "torch.distributed.run",
                   # the operator sets PET_NNODES, PET_NODE_RANK, PET_MASTER_ADDR/PORT for torchrun
                   "-m", "trainer", "--config", f"{RECIPE_MOUNT}/recipe.yaml", "--run-dir", job.run_dir]
        volumes = [
            {"name": "recipe", "configMap": {"name": configmap_name}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{k8s.shm_size_gib}Gi"}},
        ]
        mounts = [{"name": "recipe", "mountPath": RECIPE_MOUNT, "readOnly": True},
                  {"name": "dshm", "mountPath": "/dev/shm"}]
        if k8s.run_volume_claim:
            volumes.append({"name": "runs", "persistentVolumeClaim": {"claimName": k8s.run_volume_claim}})
            mounts.append({"name": "runs", "mountPath": job.run_dir.rsplit("/", 1)[0]})
        container = {
            "name": "pytorch",
            "image": job.image,
            "imagePullPolicy": "IfNotPresent",
            "command": command,
            "env": [{"name": k, "value": v} for k, v in job.env.items()],
            "resources": {"limits": {"nvidia.com/gpu": gpus}, "requests": {"nvidia.com/gpu": gpus}},
            "volumeMounts": mounts,
        }
        pod_spec = {"containers": [container], "volumes": volumes}
        if k8s.node_selector:
            pod_spec["nodeSelector"] = dict(k8s.node_selector)
        if k8s.tolerations:
            pod_spec["tolerations"] = [{k: v for k, v in vars(t).items() if v is not None} for t in k8s.tolerations]
        if k8s.service_account:
            pod_spec["serviceAccountName"] = k8s.service_account
        if k8s.priority_class:
            pod_spec["priorityClassName"] = k8s.priority_class

        def replica(count: int) -> dict:
            return {"replicas": count, "restartPolicy": k8s.restart_policy,
                    "template": {"metadata": {"labels": labels}, "spec": pod_spec}}

        replicas = {"Master": replica(1)}
        if job.nnodes > 1:
            replicas["Worker"] = replica(job.nnodes - 1)
        pytorchjob = {
            "apiVersion": "kubeflow.org/v1",
            "kind": "PyTorchJob",
            "metadata": {"name": name, "namespace": k8s.namespace, "labels": labels},
            "spec": {
                "runPolicy": {"backoffLimit": k8s.backoff_limit, "cleanPodPolicy": "None",
                              "activeDeadlineSeconds": time_limit_seconds(job.recipe.job.time_limit)},
                "nprocPerNode": str(gpus),
                "pytorchReplicaSpecs": replicas,
            },
        }
        problems = webhook_problems(pytorchjob)
        if problems:  # a bug in this module, not in the user's input
            raise AssertionError("; ".join(problems))
        return configmap, pytorchjob

    def render(self, job: Job) -> dict[str, str]:
        if self.cluster.on_cpu:
            raise UserError(f"{self.cluster.source}: gpus_per_node: Kubernetes jobs need GPUs")
        configmap, pytorchjob = self.manifests(job)
        return {"configmap.yaml": _dump(configmap), "pytorchjob.yaml": _dump(pytorchjob)}


class _Dumper(yaml.SafeDumper):
    """Writes multi-line strings (the recipe in the ConfigMap) as readable literal blocks."""


_Dumper.add_representer(str, lambda d, s: d.represent_scalar(
    "tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))


def _dump(manifest: dict) -> str:
    return yaml.dump(manifest, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=1000)
