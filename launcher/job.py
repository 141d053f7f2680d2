"""A job: a resolved recipe, its cluster and plan, and the values every backend renders."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from launcher import __version__
from launcher.cluster import Cluster, load_cluster
from launcher.errors import UserError
from launcher.plan.check import Plan, make_plan
from launcher.plan.models import read_model
from launcher.recipe import Recipe, load_recipe

# Ends the here-document that carries the resolved recipe inside the job scripts.
HEREDOC = "MOE_LAUNCHER_RECIPE_END"


@dataclass
class Job:
    recipe: Recipe
    recipe_source: str
    cluster: Cluster
    plan: Plan
    run_dir: str
    image: str | None
    env: dict[str, str]

    @property
    def name(self) -> str:
        return self.recipe.job.name

    @property
    def nnodes(self) -> int:
        return self.recipe.trainer.nnodes

    @property
    def nproc_per_node(self) -> int:
        return self.recipe.trainer.n_gpus_per_node

    @property
    def recipe_yaml(self) -> str:
        header = (f"# Resolved by moe-launcher {__version__} from {self.recipe_source} "
                  f"for cluster {self.cluster.name}.\n")
        return header + self.recipe.to_yaml()

    @property
    def version(self) -> str:
        return __version__


def prepare_job(recipe_path: str, cluster_name: str, overrides=(), require_ok: bool = True) -> Job:
    """Load and check everything a render or submit needs; raise UserError if the job cannot run."""
    cluster = load_cluster(cluster_name)
    recipe = load_recipe(recipe_path, overrides)
    try:
        plan = make_plan(recipe, cluster, read_model(recipe.model.path, recipe_path))
    except UserError as err:
        raise UserError(*(p if p.startswith(str(recipe_path)) else f"{recipe_path}: {p}" for p in err.problems))
    if require_ok and not plan.ok:
        raise UserError(*(f"{recipe_path}: {p}" for p in plan.problems))
    run_root = os.path.expanduser(cluster.run_root)
    if cluster.backend == "local":
        run_root = os.path.abspath(run_root)
    run_dir = f"{run_root.rstrip('/')}/{recipe.job.name}"
    if recipe.trainer.default_local_dir is None:
        recipe.trainer.default_local_dir = f"{run_dir}/checkpoints"
    image = recipe.job.image or cluster.container.image
    needs_image = cluster.backend == "kubernetes" or cluster.container.runtime != "none"
    if needs_image and not image:
        raise UserError(f"{recipe_path}: job.image: cluster '{cluster.name}' runs jobs in a container but neither "
                        f"job.image nor container.image in {cluster.source} names one")
    recipe.job.image = image
    env = {"PYTHONUNBUFFERED": "1", **cluster.env, **recipe.job.env}
    return Job(recipe=recipe, recipe_source=_display_path(recipe_path), cluster=cluster, plan=plan,
               run_dir=run_dir, image=image, env=env)


def _display_path(path: str) -> str:
    """The recipe's path as the user gave it, relative where it lies under the working directory."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


def layout_text(job: Job) -> str:
    lay = job.plan.layout
    return (f"world {lay.world_size} = TP{lay.tp} x CP{lay.cp} x DP{lay.dp} x PP{lay.pp}; "
            f"experts ETP{lay.etp} x EP{lay.ep} x EDP{lay.edp} x PP{lay.pp}; "
            f"{job.plan.memory.total:.1f} of {job.plan.memory.capacity:.0f} GiB per "
            f"{'process' if job.cluster.on_cpu else 'GPU'}")
