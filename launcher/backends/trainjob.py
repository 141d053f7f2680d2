"""Kubeflow Trainer's TrainJob (trainer.kubeflow.org/v1alpha1, Trainer v2.0), beside the
training operator's PyTorchJob.

A TrainJob names a ClusterTrainingRuntime (`torch-distributed`: one JobSet replicated job
`node`, whose container `node` gets torchrun's PET_* variables) and says what differs: image,
command, nodes, processes and GPUs per node, environment. Everything else the pod needs (the
recipe ConfigMap, the run volume, /dev/shm, node selector, tolerations, service account) goes in
`podSpecOverrides` aimed at the `node` job, the v2.0 name of that field (later releases call it
podTemplateOverrides). `webhook_problems` checks the rules Trainer's admission webhook enforces
that its CRD schema does not.
"""

from __future__ import annotations

API_VERSION = "trainer.kubeflow.org/v1alpha1"
GROUP, VERSION, PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"
NODE = "node"  # the torch runtime's replicated job, and its training container
# The operator's own names: the webhook refuses overrides that set these containers' env
RESERVED_CONTAINERS = ("node", "dataset-initializer", "model-initializer")


def trainjob(name: str, namespace: str, labels: dict, runtime: str, nnodes: int, gpus: int, image: str,
             command: list[str], env: list[dict], pod: dict) -> dict:
    """`pod` holds the pod-level parts: volumes, mounts, nodeSelector, tolerations,
    serviceAccountName."""
    override = {"targetJobs": [{"name": NODE}], "volumes": pod["volumes"],
                "containers": [{"name": NODE, "volumeMounts": pod["mounts"]}]}
    for key in ("nodeSelector", "tolerations", "serviceAccountName"):
        if pod.get(key):
            override[key] = pod[key]
    return {
        "apiVersion": API_VERSION,
        "kind": "TrainJob",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "runtimeRef": {"name": runtime, "apiGroup": GROUP, "kind": "ClusterTrainingRuntime"},
            "labels": labels,  # onto the JobSet and its pods
            "trainer": {
                "image": image,
                "command": command,
                "env": env,
                "numNodes": nnodes,
                "numProcPerNode": gpus,
                "resourcesPerNode": {"limits": {"nvidia.com/gpu": gpus}, "requests": {"nvidia.com/gpu": gpus}},
            },
            "podSpecOverrides": [override],
        },
    }


def webhook_problems(job: dict) -> list[str]:
    """Trainer v2.0's TrainJob validation rules that the CRD schema does not carry."""
    problems = []
    spec = job.get("spec", {})
    name = job.get("metadata", {}).get("name", "")
    if len(name) > 63 - len("-node-0-0"):  # the JobSet's pod hostnames must stay DNS labels
        problems.append(f"metadata.name {name!r} is too long for the JobSet's pod names")
    trainer = spec.get("trainer") or {}
    nodes = trainer.get("numNodes")
    if nodes is not None and nodes < 1:
        problems.append(f"spec.trainer.numNodes must be at least 1, found {nodes}")
    for override in spec.get("podSpecOverrides") or []:
        for target in override.get("targetJobs") or []:
            if target.get("name") != NODE:
                problems.append(f"podSpecOverrides: the torch runtime has no job {target.get('name')!r}")
        for container in override.get("containers") or []:
            if container.get("name") in RESERVED_CONTAINERS and (container.get("env") or container.get("envFrom")):
                problems.append(f"podSpecOverrides: env of the {container['name']!r} container goes in spec.trainer.env")
            if container.get("command") or container.get("args"):
                problems.append(f"podSpecOverrides: the command of {container.get('name')!r} goes in spec.trainer")
    return problems
