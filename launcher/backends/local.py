"""This machine: a shell script that runs torchrun --standalone."""

from __future__ import annotations

from launcher.backends.base import Backend
from launcher.backends.slurm import HEREDOC, layout_text
from launcher.errors import UserError
from launcher.job import Job
from launcher.render import render_template


class LocalBackend(Backend):
    def render(self, job: Job) -> dict[str, str]:
        if HEREDOC in job.recipe_yaml:
            raise UserError(f"{job.recipe_source}: the recipe may not contain the line {HEREDOC}")
        script = render_template("local.sh.j2", job=job, heredoc=HEREDOC, layout_text=layout_text(job))
        return {f"{job.name}.sh": script, "recipe.yaml": job.recipe_yaml}
