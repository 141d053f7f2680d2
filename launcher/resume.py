"""Runs that never mix: a run directory belongs to one recipe.

Every checkpoint keeps the resolved recipe it was trained with (in trainer_state.json). A
later submission into the same run directory resumes from it only if its recipe differs in
what may change between attempts: step counts and frequencies, paths, and the parallel layout
and memory options (checkpoints reshard to any layout). Anything else (the model, the data's
shape, the optimizer, the seed) would silently train a different run on top of this one.
Pure functions and a JSON read: the launcher runs this before queueing, the trainer again
when it resumes (on Kubernetes the launcher cannot see the run directory). `set_aside` is the
one write: `launcher submit --restart` starts the run over after moving the old one aside.
"""

from __future__ import annotations

import json
from pathlib import Path

MAY_CHANGE = (
    "trainer.total_training_steps", "trainer.total_epochs", "trainer.save_freq", "trainer.test_freq",
    "trainer.log_every", "trainer.tensorboard", "trainer.default_local_dir", "trainer.nnodes",
    "trainer.max_ckpt_to_keep", "trainer.resume_from_path", "trainer.collective_timeout_s",
    "trainer.alert_loss_spike", "trainer.alert_expert_imbalance",
    "trainer.n_gpus_per_node", "model.path", "model.tokenizer_path", "data.train_files", "data.val_files",
    "data.micro_batch_size", "megatron.", "job.",
)


def recipe_changes(started: dict, now: dict, prefix: str = "") -> list[str]:
    """'key: old -> new' for every value that differs and may not change between attempts."""
    changes = []
    for key in sorted(set(started) | set(now)):
        name = f"{prefix}{key}"
        old, new = started.get(key), now.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changes += recipe_changes(old, new, f"{name}.")
        elif old != new and not any(name == k or (k.endswith(".") and name.startswith(k)) for k in MAY_CHANGE):
            changes.append(f"{name}: {json.dumps(old)} -> {json.dumps(new)}")
    return changes


def started_recipe(checkpoints: Path) -> tuple[Path, dict] | None:
    """The latest checkpoint under `checkpoints` and the recipe it was trained with, if any."""
    try:
        step = checkpoints / (checkpoints / "latest").read_text().strip()
        state = json.loads((step / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return None
    return (step, state["recipe"]) if isinstance(state.get("recipe"), dict) else None


def refusal(checkpoints: Path, now: dict) -> str | None:
    """One line saying why this recipe may not resume the run in `checkpoints`, or None."""
    found = started_recipe(checkpoints)
    if found is None:
        return None
    step, started = found
    changes = recipe_changes(started, now)
    if not changes:
        return None
    return (f"the run's checkpoint {step} was trained with another recipe: {'; '.join(changes[:5])}"
            f"{f' (and {len(changes) - 5} more)' if len(changes) > 5 else ''}; submit with those values, "
            "set another job.name, or start this run over with `launcher submit --restart`")


def set_aside(run_dir: Path, checkpoints: Path, stamp: str) -> list[Path]:
    """Rename the run's checkpoints and metrics to NAME.before-STAMP, so that a new run starts
    at step 1 in the same run directory and nothing of the old one is lost; the new names."""
    moved = []
    for path in (checkpoints, run_dir / "metrics.jsonl", run_dir / "tensorboard"):
        if path.exists():
            target = path.with_name(f"{path.name}.before-{stamp}")
            path.rename(target)
            moved.append(target)
    return moved
