"""One backend per place jobs run, all behind `Backend` (launcher.backends.base)."""

from __future__ import annotations

from launcher.backends.base import Backend
from launcher.cluster import Cluster


def backend_for(cluster: Cluster) -> Backend:
    if cluster.backend == "slurm":
        from launcher.backends.slurm import SlurmBackend
        return SlurmBackend(cluster)
    if cluster.backend == "kubernetes":
        from launcher.backends.kubernetes import KubernetesBackend
        return KubernetesBackend(cluster)
    from launcher.backends.local import LocalBackend
    return LocalBackend(cluster)
