"""Slurm: an sbatch script that runs torchrun on every node through one srun."""

from __future__ import annotations

from launcher.backends.base import Backend
from launcher.errors import UserError
from launcher.job import Job
from launcher.render import render_template

HEREDOC = "MOE_LAUNCHER_RECIPE_END"

# Options newer than some Slurm releases still in service: (first version, option).
# The cluster profile's slurm.version decides whether the script may use them.
OOM_KILL_STEP_SINCE = (24, 11)


def slurm_version(text: str, source: str) -> tuple[int, int]:
    try:
        major, minor = text.split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        raise UserError(f"{source}: slurm.version: '{text}' is not a Slurm release such as 22.05 or 24.11") from None


def layout_text(job: Job) -> str:
    lay = job.plan.layout
    return (f"world {lay.world_size} = TP{lay.tp} x CP{lay.cp} x DP{lay.dp} x PP{lay.pp}; "
            f"experts ETP{lay.etp} x EP{lay.ep} x EDP{lay.edp} x PP{lay.pp}; "
            f"{job.plan.memory.total:.1f} of {job.plan.memory.capacity:.0f} GiB per "
            f"{'process' if job.cluster.on_cpu else 'GPU'}")


class SlurmBackend(Backend):
    def render(self, job: Job) -> dict[str, str]:
        cluster = self.cluster
        if HEREDOC in job.recipe_yaml:
            raise UserError(f"{job.recipe_source}: the recipe may not contain the line {HEREDOC}")
        cpus = cluster.cpus_per_node if cluster.slurm.exclusive else max(1, job.nproc_per_node)
        run_root = job.run_dir.rsplit("/", 1)[0]
        mounts = [f"{run_root}:{run_root}", *cluster.container.mounts]
        script = render_template(
            "slurm.sbatch.j2",
            job=job,
            slurm=cluster.slurm,
            container=cluster.container,
            gpus_per_node=0 if cluster.on_cpu else job.nproc_per_node,
            cpus_per_task=min(cpus, cluster.cpus_per_node),
            log_file=f"{job.run_dir}/logs/slurm-%j.out",
            heredoc=HEREDOC,
            mounts=mounts,
            oom_kill_step=slurm_version(cluster.slurm.version, cluster.source) >= OOM_KILL_STEP_SINCE,
            layout_text=layout_text(job),
        )
        return {f"{job.name}.sbatch": script, "recipe.yaml": job.recipe_yaml}
