"""Cluster profiles: where jobs run and what a node has.

`--cluster NAME` reads clusters/NAME.yaml (from the checkout or the installed wheel);
anything with a '/' or ending in .yaml is read as a path. The trainer never reads these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from launcher.errors import UserError, closest
from launcher.recipe import looks_secret
from launcher.resources import resource_dir
from launcher.schema import build, choices, load_yaml


@dataclass
class ContainerSection:
    # pyxis: srun --container-image; apptainer: apptainer exec --nv; none: the node's own Python
    runtime: str = choices("pyxis", "apptainer", "none", default="none")
    image: Optional[str] = None
    mounts: list[str] = field(default_factory=list)  # host:container, for pyxis and apptainer


@dataclass
class SlurmSection:
    version: str = "23.11"  # decides which options the rendered script may use
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    exclusive: bool = True
    requeue: bool = True
    # Seconds before the time limit at which the job is told to save and requeue itself.
    signal_before_timeout_s: int = 300
    mem_per_node: str = "0"  # Slurm --mem; "0" is the whole node
    conf: Optional[str] = None  # SLURM_CONF for the client commands, when not the system's


@dataclass
class Toleration:
    key: str
    operator: str = choices("Exists", "Equal", default="Exists")
    value: Optional[str] = None
    effect: Optional[str] = None


@dataclass
class SecretRef:
    secret: str  # a Secret in the job's namespace
    key: str  # the key inside it


@dataclass
class KubernetesSection:
    namespace: str = "default"
    kubeconfig: Optional[str] = None  # default: $KUBECONFIG, then ~/.kube/config
    context: Optional[str] = None
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[Toleration] = field(default_factory=list)
    # The volume that holds run directories (checkpoints, logs); mounted at run_root.
    run_volume_claim: Optional[str] = None
    shm_size_gib: int = 64
    # Seconds an evicted pod has, after SIGTERM, to finish its step and save a checkpoint.
    termination_grace_s: int = 300
    restart_policy: str = choices("OnFailure", "Never", "Always", "ExitCode", default="OnFailure")
    backoff_limit: int = 3
    service_account: Optional[str] = None
    # Environment variables read from Secrets (secretKeyRef), for every job: HF_TOKEN: {secret: hf, key: token}.
    secrets: dict[str, SecretRef] = field(default_factory=dict)
    # Secrets holding registry credentials for the image (PyTorchJob; a TrainJob takes them from
    # its service account or runtime).
    image_pull_secrets: list[str] = field(default_factory=list)
    priority_class: Optional[str] = None
    # The job kind: Kubeflow's training operator (PyTorchJob, kubeflow.org/v1) or Kubeflow
    # Trainer (TrainJob, trainer.kubeflow.org/v1alpha1) with the ClusterTrainingRuntime named by
    # `runtime`. `trainer_version` pins the Trainer release the TrainJob is written for: its
    # override fields were renamed between releases (v2.0: podSpecOverrides).
    api: str = choices("pytorchjob", "trainjob", default="pytorchjob")
    runtime: str = "torch-distributed"
    trainer_version: str = choices("v2.0", default="v2.0")


@dataclass
class HardwareSection:
    # Figures for the speed estimate of `launcher plan --search`; unset ones come from the table
    # in launcher/plan/speed.py for gpu_type (H100, H200, A100, B200).
    peak_tflops: Optional[float] = None  # dense bf16 per GPU
    mfu: Optional[float] = None  # fraction of the peak the trainer's matmuls reach
    nvlink_gb_s: Optional[float] = None  # per GPU inside a node, as collectives achieve it
    network_gb_s: Optional[float] = None  # per GPU across nodes
    host_gb_s: Optional[float] = None  # GPU <-> host memory
    # Whether the jobs run transformer-engine's layers (the project's image has it); default:
    # yes on Slurm and Kubernetes GPU clusters, no elsewhere
    transformer_engine: Optional[bool] = None


@dataclass
class Cluster:
    name: str
    backend: str = choices("local", "slurm", "kubernetes")
    gpus_per_node: int = 8  # 0: CPU nodes
    gpu_memory_gib: float = 80.0  # per GPU; on CPU nodes: host memory for all processes
    gpu_type: Optional[str] = None
    cpus_per_node: int = 64
    max_nodes: Optional[int] = None
    run_root: str = "~/moe-runs"  # run directories go here; a shared file system on clusters
    python: str = "python3"  # the interpreter that runs torchrun and the trainer inside the job
    container: ContainerSection = field(default_factory=ContainerSection)
    env: dict[str, str] = field(default_factory=dict)  # NCCL/UCX settings for every job
    slurm: SlurmSection = field(default_factory=SlurmSection)
    kubernetes: KubernetesSection = field(default_factory=KubernetesSection)
    hardware: HardwareSection = field(default_factory=HardwareSection)
    source: str = ""  # the file this came from (set when loading)

    @property
    def on_cpu(self) -> bool:
        return self.gpus_per_node == 0


def available_clusters() -> list[str]:
    return sorted(p.stem for p in resource_dir("clusters").glob("*.yaml"))


def cluster_path(name: str) -> Path:
    if "/" in name or name.endswith((".yaml", ".yml")):
        return Path(name)
    path = resource_dir("clusters") / f"{name}.yaml"
    if not path.exists():
        names = available_clusters()
        raise UserError(f"--cluster {name}: no such cluster profile{closest(name, names)}; "
                        f"choose one of {', '.join(names)} or give a path to a profile")
    return path


def load_cluster(name: str) -> Cluster:
    path = cluster_path(name)
    data, lines = load_yaml(path)
    data.setdefault("name", path.stem)
    cluster = build(Cluster, data, path, lines)
    cluster.source = str(path)
    problems = []
    if cluster.backend == "kubernetes" and cluster.on_cpu:
        problems.append(f"{path}: gpus_per_node: 0 is not supported on Kubernetes; give the GPUs per node")
    for name in cluster.env:
        if looks_secret(name):
            problems.append(f"{path}: env.{name}: looks like a secret, and env values are written into every job "
                            f"spec; name it in a recipe's job.secrets (Kubernetes: kubernetes.secrets) instead")
    if cluster.kubernetes.image_pull_secrets and cluster.kubernetes.api == "trainjob":
        problems.append(f"{path}: kubernetes.image_pull_secrets: a TrainJob cannot set them; give them to "
                        "kubernetes.service_account or the ClusterTrainingRuntime, or use kubernetes.api: pytorchjob")
    if problems:
        raise UserError(*problems)
    return cluster
