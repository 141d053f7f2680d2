"""Kubernetes: a ConfigMap holding the recipe and the job, a Kubeflow PyTorchJob
(kubeflow.org/v1) or, with the profile's `kubernetes.api: trainjob`, a Kubeflow Trainer
TrainJob (launcher.backends.trainjob).

Manifests are built as plain data and written as YAML; `kubectl apply -f DIR` applies them
(the ConfigMap's file sorts first). The operators' admission webhooks enforce rules their CRD
schemas lack; `webhook_problems` checks them here so a bad manifest fails at render time, not
in the cluster.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import yaml

from launcher.backends import trainjob
from launcher.backends.base import Backend, JobStatus
from launcher.errors import UserError
from launcher.job import Job
from launcher.recipe import time_limit_seconds
from launcher.render import rfc1123_name
from launcher.store import JobRecord, now

RECIPE_MOUNT = "/etc/moe-launcher"
# Pods are named <job>-worker-<index>; keep room for that inside 63 characters.
MAX_JOB_NAME = 40
# An evicted pod gets SIGTERM (on its first process, this shell) and terminationGracePeriodSeconds
# before SIGKILL. The shell does not pass it on to torchrun, which would stop its workers and exit
# 1; it asks the trainer, through the file the Slurm script uses near a time limit, to finish its
# step, save and exit 0, and waits for it.
STOP_ON_TERM = (
    'rm -f "$MOE_RUN_DIR/SAVE_AND_EXIT"; "$@" & child=$!; '
    'trap \'echo "moe-launcher: SIGTERM: asking the trainer to checkpoint and stop" >&2; '
    'mkdir -p "$MOE_RUN_DIR"; touch "$MOE_RUN_DIR/SAVE_AND_EXIT"\' TERM; '
    'while :; do wait "$child"; status=$?; kill -0 "$child" 2>/dev/null || break; done; exit "$status"')
# Workers meet at the first node's service name, which can take a while to appear in DNS; a
# rendezvous that starts before it resolves fails the job. The pod's script waits for it
# (bounded, saying so), then runs the command given as arguments (no value is ever pasted into
# the script) as STOP_ON_TERM says.
POD_SCRIPT = (
    'addr="${PET_MASTER_ADDR:-${MASTER_ADDR:-}}"; waited=0; limit="${MOE_MASTER_WAIT_S:-300}"; '
    'while [ -n "$addr" ] && ! getent hosts "$addr" >/dev/null 2>&1; do '
    'if [ "$waited" -ge "$limit" ]; then '
    'echo "moe-launcher: $addr does not resolve after ${waited} s; starting anyway" >&2; break; fi; '
    'echo "moe-launcher: waiting for $addr to resolve (${waited} s of ${limit})" >&2; '
    'sleep 5; waited=$((waited + 5)); done; '
    + STOP_ON_TERM)


def secret_env(job: Job, cluster) -> list[dict]:
    """Environment entries that read the profile's Secrets (never their values); every name in the
    recipe's job.secrets must be among them."""
    refs = cluster.kubernetes.secrets
    missing = [n for n in job.recipe.job.secrets if n not in refs]
    if missing:
        raise UserError(f"{job.recipe_source}: job.secrets: {', '.join(missing)}: cluster profile {cluster.source} "
                        f"has no kubernetes.secrets entry for {'them' if len(missing) > 1 else 'it'}; add for "
                        f"example `{missing[0]}: {{secret: NAME, key: KEY}}` under kubernetes.secrets")
    return [{"name": name, "valueFrom": {"secretKeyRef": {"name": ref.secret, "key": ref.key}}}
            for name, ref in refs.items()]


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

# Job conditions of both kinds (TrainJob: Created, Complete, Failed, Suspended; it runs while a
# JobSet job is active)
CONDITION_STATES = {"Created": "PENDING", "Running": "RUNNING", "Restarting": "RUNNING",
                    "Succeeded": "COMPLETED", "Complete": "COMPLETED", "Failed": "FAILED", "Suspended": "PENDING"}
GROUP, VERSION, PLURAL = "kubeflow.org", "v1", "pytorchjobs"


@dataclass(frozen=True)
class JobKind:
    """Where a job kind lives in the API, and how to find its first node's pod and container."""
    kind: str
    group: str
    version: str
    plural: str
    first_pod_labels: tuple  # label selector parts, with {name}
    container: str

    def selector(self, name: str) -> str:
        return ",".join(part.format(name=name) for part in self.first_pod_labels)


KINDS = {
    "pytorchjob": JobKind("PyTorchJob", GROUP, VERSION, PLURAL,
                          ("training.kubeflow.org/job-name={name}", "training.kubeflow.org/replica-type=master"),
                          "pytorch"),
    "trainjob": JobKind("TrainJob", trainjob.GROUP, trainjob.VERSION, trainjob.PLURAL,
                        ("jobset.sigs.k8s.io/jobset-name={name}", f"jobset.sigs.k8s.io/replicatedjob-name={trainjob.NODE}",
                         "batch.kubernetes.io/job-completion-index=0"), trainjob.NODE),
}


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

    def kind(self, record: JobRecord | None = None) -> JobKind:
        api = record.details.get("api", "pytorchjob") if record else self.cluster.kubernetes.api
        return KINDS[api]

    def submit(self, job: Job, files: dict[str, str]) -> JobRecord:
        configmap, manifest = self.manifests(job)
        kind = self.kind()
        core, custom = _api(self.cluster)
        namespace = manifest["metadata"]["namespace"]
        name = manifest["metadata"]["name"]
        _call(f"create ConfigMap {configmap['metadata']['name']}", core.create_namespaced_config_map,
              namespace, configmap)
        try:
            _call(f"create {kind.kind} {name}", custom.create_namespaced_custom_object,
                  kind.group, kind.version, namespace, kind.plural, manifest)
        except UserError:
            # nothing half-submitted: the recipe's ConfigMap goes too
            _call("delete ConfigMap", core.delete_namespaced_config_map, configmap["metadata"]["name"], namespace)
            raise
        return JobRecord(job_id=f"k8s/{namespace}/{name}", backend="kubernetes", cluster=self.cluster.source,
                         name=job.name, run_dir=job.run_dir, submitted_at=now(),
                         details={"namespace": namespace, "name": name, "configmap": configmap["metadata"]["name"],
                                  "api": self.cluster.kubernetes.api})

    def status(self, record: JobRecord) -> JobStatus:
        from kubernetes.client.exceptions import ApiException

        core, custom = _api(self.cluster)
        kind = self.kind(record)
        ns, name = record.details["namespace"], record.details["name"]
        try:
            obj = custom.get_namespaced_custom_object(kind.group, kind.version, ns, kind.plural, name)
        except ApiException as err:
            if err.status == 404:
                cancelled = record.details.get("cancelled")
                return JobStatus("CANCELLED" if cancelled else "UNKNOWN",
                                 reason=None if cancelled else f"the {kind.kind} no longer exists")
            raise _api_error(f"get {kind.kind} {name}", err) from None
        status = obj.get("status") or {}
        state, reason = "PENDING", None
        for condition in status.get("conditions") or []:
            if condition.get("status") == "True" and condition.get("type") in CONDITION_STATES:
                state = CONDITION_STATES[condition["type"]]
                reason = condition.get("reason")
        if state == "PENDING" and any((j.get("active") or 0) > 0 for j in status.get("jobsStatus") or []):
            state = "RUNNING"  # a TrainJob's JobSet has running jobs
        pod = self._master_pod(core, record)
        exit_code, nodes = None, None
        if pod is not None:
            nodes = (pod.get("spec") or {}).get("nodeName")
            for container in (pod.get("status") or {}).get("containerStatuses") or []:
                terminated = (container.get("state") or {}).get("terminated")
                if container.get("name") == kind.container and terminated:
                    exit_code = terminated.get("exitCode")
        return JobStatus(state, exit_code=exit_code if state in ("COMPLETED", "FAILED") else None, nodes=nodes,
                         start=status.get("startTime"), end=status.get("completionTime"), reason=reason)

    def _master_pod(self, core, record: JobRecord) -> dict | None:
        ns, name = record.details["namespace"], record.details["name"]
        pods = _call("list pods", core.list_namespaced_pod, ns, _preload_content=False,
                     label_selector=self.kind(record).selector(name))
        items = json.loads(pods.data).get("items") or []
        return items[0] if items else None

    def log_path(self, record: JobRecord):
        return None  # logs come from the first node's pod

    def logs(self, record: JobRecord, follow: bool = False, poll_s: float = 2.0):
        """The first node's pod log; following it across restarts of its container and
        recreations of the pod, each marked, the new attempt's log from its start."""
        import time

        core, _ = _api(self.cluster)
        seen, attempt = 0, None
        while True:
            ended = follow and self.status(record).finished  # asked first: the read below then has the end
            pod = self._master_pod(core, record)
            if pod is not None:
                name = pod["metadata"]["name"]
                text = _call("read log", core.read_namespaced_pod_log, name, record.details["namespace"],
                             container=self.kind(record).container)
                now = (pod["metadata"].get("uid", name),
                       sum(c.get("restartCount", 0) for c in pod.get("status", {}).get("containerStatuses") or []))
                if attempt is not None and (now != attempt or len(text) < seen):
                    yield f"--- moe-launcher: {name} restarted; its log from the start ---\n"
                    seen = 0
                attempt = now
                if len(text) > seen:
                    yield text[seen:]
                    seen = len(text)
            if not follow or ended:
                return
            time.sleep(poll_s)

    def cancel(self, record: JobRecord) -> None:
        from kubernetes.client.exceptions import ApiException

        core, custom = _api(self.cluster)
        kind = self.kind(record)
        ns = record.details["namespace"]
        for action, fn, name in ((f"delete {kind.kind}", custom.delete_namespaced_custom_object, None),
                                 ("delete ConfigMap", core.delete_namespaced_config_map, record.details["configmap"])):
            try:
                if name is None:
                    fn(kind.group, kind.version, ns, kind.plural, record.details["name"])
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
        """The recipe's ConfigMap and the job (PyTorchJob or TrainJob)."""
        k8s = self.cluster.kubernetes
        name, configmap_name = self.names(job)
        labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/managed-by": "moe-launcher"}
        configmap = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": configmap_name, "namespace": k8s.namespace, "labels": labels},
            "data": {"recipe.yaml": job.recipe_yaml},
        }
        # torchrun takes the node count, rank and master from the operator's PET_* variables
        command = ["sh", "-c", POD_SCRIPT, "moe-pod", job.cluster.python, "-m", "torch.distributed.run",
                   "-m", "trainer", "--config", f"{RECIPE_MOUNT}/recipe.yaml", "--run-dir", job.run_dir]
        env = [{"name": k, "value": v} for k, v in job.env.items()]
        env.append({"name": "MOE_JOB_ID", "value": f"k8s/{k8s.namespace}/{name}"})  # in every metrics record
        env.append({"name": "MOE_RUN_DIR", "value": job.run_dir})  # where SIGTERM leaves the stop file
        env += secret_env(job, self.cluster)
        pod = self.pod_parts(job, configmap_name)
        if k8s.api == "trainjob":
            if k8s.priority_class:
                raise UserError(f"{self.cluster.source}: kubernetes.priority_class: a TrainJob (Trainer "
                                f"{k8s.trainer_version}) cannot set it; set it in the ClusterTrainingRuntime "
                                f"{k8s.runtime!r} or use kubernetes.api: pytorchjob")
            manifest = trainjob.trainjob(name, k8s.namespace, labels, k8s.runtime, job.nnodes, job.nproc_per_node,
                                         job.image, command, env, pod)
            problems = trainjob.webhook_problems(manifest)
        else:
            manifest = self.pytorchjob(job, name, labels, command, env, pod)
            problems = webhook_problems(manifest)
        if problems:  # a bug in this module, not in the user's input
            raise AssertionError("; ".join(problems))
        return configmap, manifest

    def pod_parts(self, job: Job, configmap_name: str) -> dict:
        """What every pod of the job needs beside the container's command: volumes and their
        mounts (recipe, /dev/shm in memory, the run volume) and placement."""
        k8s = self.cluster.kubernetes
        volumes = [
            {"name": "recipe", "configMap": {"name": configmap_name}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{k8s.shm_size_gib}Gi"}},
        ]
        mounts = [{"name": "recipe", "mountPath": RECIPE_MOUNT, "readOnly": True},
                  {"name": "dshm", "mountPath": "/dev/shm"}]
        if k8s.run_volume_claim:
            volumes.append({"name": "runs", "persistentVolumeClaim": {"claimName": k8s.run_volume_claim}})
            mounts.append({"name": "runs", "mountPath": job.run_dir.rsplit("/", 1)[0]})
        pod = {"volumes": volumes, "mounts": mounts}
        if k8s.node_selector:
            pod["nodeSelector"] = dict(k8s.node_selector)
        if k8s.tolerations:
            pod["tolerations"] = [{k: v for k, v in vars(t).items() if v is not None} for t in k8s.tolerations]
        if k8s.service_account:
            pod["serviceAccountName"] = k8s.service_account
        return pod

    def pytorchjob(self, job: Job, name: str, labels: dict, command: list[str], env: list[dict], pod: dict) -> dict:
        k8s = self.cluster.kubernetes
        gpus = job.nproc_per_node
        container = {
            "name": "pytorch",
            "image": job.image,
            "imagePullPolicy": "IfNotPresent",
            "command": command,
            "env": env,
            "resources": {"limits": {"nvidia.com/gpu": gpus}, "requests": {"nvidia.com/gpu": gpus}},
            "volumeMounts": pod["mounts"],
        }
        pod_spec = {"containers": [container], "volumes": pod["volumes"],
                    "terminationGracePeriodSeconds": k8s.termination_grace_s}
        for key in ("nodeSelector", "tolerations", "serviceAccountName"):
            if key in pod:
                pod_spec[key] = pod[key]
        if k8s.priority_class:
            pod_spec["priorityClassName"] = k8s.priority_class
        if k8s.image_pull_secrets:
            pod_spec["imagePullSecrets"] = [{"name": n} for n in k8s.image_pull_secrets]

        def replica(count: int) -> dict:
            return {"replicas": count, "restartPolicy": k8s.restart_policy,
                    "template": {"metadata": {"labels": labels}, "spec": pod_spec}}

        replicas = {"Master": replica(1)}
        if job.nnodes > 1:
            replicas["Worker"] = replica(job.nnodes - 1)
        return {
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

    def render(self, job: Job) -> dict[str, str]:
        if self.cluster.on_cpu:
            raise UserError(f"{self.cluster.source}: gpus_per_node: Kubernetes jobs need GPUs")
        configmap, manifest = self.manifests(job)
        return {"configmap.yaml": _dump(configmap), f"{manifest['kind'].lower()}.yaml": _dump(manifest)}


class _Dumper(yaml.SafeDumper):
    """Writes multi-line strings (the recipe in the ConfigMap) as readable literal blocks, and
    a value used twice (the labels) twice, not as a YAML alias."""

    def ignore_aliases(self, data):
        return True


_Dumper.add_representer(str, lambda d, s: d.represent_scalar(
    "tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))


def _dump(manifest: dict) -> str:
    return yaml.dump(manifest, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=1000)
