"""Kubernetes: a Kubeflow PyTorchJob (kubeflow.org/v1) and a ConfigMap holding the recipe.

Manifests are built as plain data and written as YAML; `kubectl apply -f DIR` applies them.
The operator's admission webhook enforces rules its CRD schema lacks; `webhook_problems`
checks them here so a bad manifest fails at render time, not in the cluster.
"""

from __future__ import annotations

import json
import os

import yaml

from launcher.backends.base import Backend, JobStatus
from launcher.errors import UserError
from launcher.job import Job
from launcher.recipe import time_limit_seconds
from launcher.render import rfc1123_name
from launcher.store import JobRecord, now

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


# Submit, follow and cancel through the Kubernetes API (the `kubernetes` client, imported
# only here: rendering never loads it).

CONDITION_STATES = {"Created": "PENDING", "Running": "RUNNING", "Restarting": "RUNNING",
                    "Succeeded": "COMPLETED", "Failed": "FAILED", "Suspended": "PENDING"}
GROUP, VERSION, PLURAL = "kubeflow.org", "v1", "pytorchjobs"


def _api(cluster):
    try:
        from kubernetes import client, config
        from kubernetes.config.config_exception import ConfigException
    except ImportError:
        raise UserError("the kubernetes package is missing: pip install kubernetes") from None
    k8s = cluster.kubernetes
    path = os.path.expanduser(k8s.kubeconfig) if k8s.kubeconfig else None
    try:
        api_client = config.new_client_from_config(config_file=path, context=k8s.context)
    except (ConfigException, OSError, TypeError) as err:
        where = path or os.environ.get("KUBECONFIG", "~/.kube/config")
        raise UserError(f"{cluster.source}: kubernetes.kubeconfig: cannot use {where}: {_first_line(err)}") from None
    return client.CoreV1Api(api_client), client.CustomObjectsApi(api_client)


def _first_line(err) -> str:
    return " ".join(str(err).split())[:300]


def _api_error(action: str, err) -> UserError:
    body = getattr(err, "body", None)
    message = None
    if body:
        try:
            message = json.loads(body).get("message")
        except (ValueError, AttributeError):
            message = str(body)[:300]
    reason = message or getattr(err, "reason", None) or _first_line(err)
    return UserError(f"{action}: the API server said: {reason}")


def _call(action: str, fn, *args, **kwargs):
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        return fn(*args, **kwargs)
    except ApiException as err:
        raise _api_error(action, err) from None
    except HTTPError as err:
        raise UserError(f"{action}: the API server does not answer: {_first_line(err)}") from None


class KubernetesJobs:
    """The API half of KubernetesBackend: submit, status, logs and cancel through the client."""

    def submit(self, job: Job, files: dict[str, str]) -> JobRecord:
        configmap, pytorchjob = self.manifests(job)
        core, custom = _api(self.cluster)
        namespace = pytorchjob["metadata"]["namespace"]
        name = pytorchjob["metadata"]["name"]
        _call(f"create ConfigMap {configmap['metadata']['name']}", core.create_namespaced_config_map,
              namespace, configmap)
        try:
            _call(f"create PyTorchJob {name}", custom.create_namespaced_custom_object,
                  GROUP, VERSION, namespace, PLURAL, pytorchjob)
        except UserError:
            # nothing half-submitted: the recipe's ConfigMap goes too
            _call("delete ConfigMap", core.delete_namespaced_config_map, configmap["metadata"]["name"], namespace)
            raise
        return JobRecord(job_id=f"k8s/{namespace}/{name}", backend="kubernetes", cluster=self.cluster.source,
                         name=job.name, run_dir=job.run_dir, submitted_at=now(),
                         details={"namespace": namespace, "name": name, "configmap": configmap["metadata"]["name"]})

    def status(self, record: JobRecord) -> JobStatus:
        from kubernetes.client.exceptions import ApiException

        core, custom = _api(self.cluster)
        ns, name = record.details["namespace"], record.details["name"]
        try:
            obj = custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
        except ApiException as err:
            if err.status == 404:
                cancelled = record.details.get("cancelled")
                return JobStatus("CANCELLED" if cancelled else "UNKNOWN",
                                 reason=None if cancelled else "the PyTorchJob no longer exists")
            raise _api_error(f"get PyTorchJob {name}", err) from None
        status = obj.get("status") or {}
        state, reason = "PENDING", None
        for condition in status.get("conditions") or []:
            if condition.get("status") == "True" and condition.get("type") in CONDITION_STATES:
                state = CONDITION_STATES[condition["type"]]
                reason = condition.get("reason")
        pod = self._master_pod(core, record)
        exit_code, nodes = None, None
        if pod is not None:
            nodes = (pod.get("spec") or {}).get("nodeName")
            for container in (pod.get("status") or {}).get("containerStatuses") or []:
                terminated = (container.get("state") or {}).get("terminated")
                if container.get("name") == "pytorch" and terminated:
                    exit_code = terminated.get("exitCode")
        return JobStatus(state, exit_code=exit_code if state in ("COMPLETED", "FAILED") else None, nodes=nodes,
                         start=status.get("startTime"), end=status.get("completionTime"), reason=reason)

    def _master_pod(self, core, record: JobRecord) -> dict | None:
        ns, name = record.details["namespace"], record.details["name"]
        pods = _call("list pods", core.list_namespaced_pod, ns, _preload_content=False,
                     label_selector=f"training.kubeflow.org/job-name={name},training.kubeflow.org/replica-type=master")
        items = json.loads(pods.data).get("items") or []
        return items[0] if items else None

    def log_path(self, record: JobRecord):
        return None  # logs come from the master pod

    def logs(self, record: JobRecord, follow: bool = False, poll_s: float = 2.0):
        import time

        core, _ = _api(self.cluster)
        seen = 0
        while True:
            pod = self._master_pod(core, record)
            if pod is not None:
                text = _call("read log", core.read_namespaced_pod_log, pod["metadata"]["name"],
                             record.details["namespace"], container="pytorch")
                if len(text) > seen:
                    yield text[seen:]
                    seen = len(text)
            if not follow or self.status(record).finished:
                return
            time.sleep(poll_s)

    def cancel(self, record: JobRecord) -> None:
        from kubernetes.client.exceptions import ApiException

        core, custom = _api(self.cluster)
        ns = record.details["namespace"]
        for action, fn, name in (("delete PyTorchJob", custom.delete_namespaced_custom_object, None),
                                 ("delete ConfigMap", core.delete_namespaced_config_map, record.details["configmap"])):
            try:
                if name is None:
                    fn(GROUP, VERSION, ns, PLURAL, record.details["name"])
                else:
                    fn(name, ns)
            except ApiException as err:
                if err.status != 404:
                    raise _api_error(action, err) from None
        record.details["cancelled"] = True
        from launcher.store import JobStore

        JobStore().add(record)


class KubernetesBackend(KubernetesJobs, Backend):
    name = "kubernetes"

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
