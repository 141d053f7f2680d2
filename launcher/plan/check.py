"""The whole plan for one recipe on one cluster: layout, memory, and whether it can run."""

from __future__ import annotations

from dataclasses import dataclass

from launcher.cluster import Cluster
from launcher.errors import UserError
from launcher.plan.layout import Layout, plan_layout
from launcher.plan.memory import Memory, estimate_memory, memory_budget
from launcher.plan.lora import adapted, adapts_experts
from launcher.plan.models import ModelDims
from launcher.recipe import LoraSection, Recipe


@dataclass(frozen=True)
class Plan:
    model: ModelDims
    layout: Layout
    memory: Memory
    problems: tuple[str, ...]  # reasons the job cannot run (memory, cluster size); empty when it can

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {**self.layout.to_dict(), "memory_gib": self.memory.to_dict(), "fits": self.memory.fits,
                "ok": self.ok, "problems": list(self.problems), "warnings": list(self.layout.warnings),
                "model": {"family": self.model.family, "params_b": round(self.model.total_params() / 1e9, 2),
                          "active_params_b": round(self.model.active_params() / 1e9, 2),
                          "params_per_gpu_b": round(self.memory.params_per_gpu / 1e9, 3)}}


def make_plan(recipe: Recipe, cluster: Cluster, model: ModelDims) -> Plan:
    """Raises UserError for layouts megatron-core rejects; returns a Plan whose `problems`
    say why a valid layout still cannot run on this cluster (too few GPUs, out of memory)."""
    trainer = recipe.trainer
    if cluster.backend == "local" and trainer.nnodes != 1:
        raise UserError(f"trainer.nnodes={trainer.nnodes}: cluster '{cluster.name}' runs on this machine only; "
                        "set trainer.nnodes=1")
    layout = plan_layout(recipe, model, cluster.gpus_per_node or None)
    _check_lora(recipe, model, layout)
    problems = []
    if not cluster.on_cpu and trainer.n_gpus_per_node > cluster.gpus_per_node:
        problems.append(f"trainer.n_gpus_per_node={trainer.n_gpus_per_node}: nodes of cluster '{cluster.name}' "
                        f"have {cluster.gpus_per_node} GPUs; set trainer.n_gpus_per_node={cluster.gpus_per_node} "
                        f"and trainer.nnodes={-(-recipe.world_size // cluster.gpus_per_node)}")
    if cluster.max_nodes and trainer.nnodes > cluster.max_nodes:
        problems.append(f"trainer.nnodes={trainer.nnodes}: cluster '{cluster.name}' has at most "
                        f"{cluster.max_nodes} nodes")
    capacity, overhead = memory_budget(recipe, cluster)
    memory = estimate_memory(recipe, model, layout, capacity, overhead_gib=overhead)
    if not memory.fits:
        problems.append(_memory_problem(recipe, cluster, memory))
    return Plan(model=model, layout=layout, memory=memory, problems=tuple(problems))


def _check_lora(recipe: Recipe, model: ModelDims, layout) -> None:
    lora = recipe.model.lora
    if not lora.enabled:
        return
    targets = adapted(model, lora)
    if not targets:
        raise UserError(f"model.lora.target_modules: {model.family} has none of {sorted(lora.targets())}; "
                        f"it has {', '.join(sorted(adapted(model, LoraSection(target_modules=['all-linear', 'router']))))}")
    if layout.etp not in (1, layout.tp) and adapts_experts(model, lora):
        # the adapter parts every ETP rank holds whole are counted in the gradient norm once per
        # TP group (trainer.model.lora): that holds where the two groups are the same
        raise UserError(f"model.lora: adapters on the routed experts need megatron.expert_tensor_parallel_size "
                        f"1 or equal to tensor_model_parallel_size ({layout.tp}); it is {layout.etp}. Set it so, "
                        "or leave linear_fc1/linear_fc2 out of model.lora.target_modules")


def _memory_problem(recipe: Recipe, cluster: Cluster, memory: Memory) -> str:
    fixes = []
    if not recipe.model.enable_gradient_checkpointing and memory.activations > 1:
        fixes.append("model.enable_gradient_checkpointing=true")
    if not recipe.megatron.optimizer_offload and memory.optimizer > 1:
        fixes.append("megatron.optimizer_offload=true")
    if recipe.data.micro_batch_size > 1:
        fixes.append("a smaller data.micro_batch_size")
    fixes.append("more GPUs or a larger EP/PP (`launcher plan --search` lists the layouts that fit)")
    unit = "process" if cluster.on_cpu else "GPU"
    return (f"needs {memory.total:.1f} GiB per {unit} on pipeline stage {memory.stage} (params {memory.params:.1f}, "
            f"grads {memory.grads:.1f}, optimizer {memory.optimizer:.1f}, activations {memory.activations:.1f}, "
            f"overhead {memory.overhead:.1f}) but cluster '{cluster.name}' has {memory.capacity:.1f} GiB; "
            f"try {', '.join(fixes)}")
