"""Recipes: what to train, on how many GPUs, with which parallel layout.

The keys follow verl's Megatron SFT config (model, data, megatron, optim, trainer) so that
users can bring their files, plus a `job` section for the scheduler. `load_recipe` reads a
YAML file, applies key=value overrides, checks every key and type, and resolves the
defaults that depend only on the recipe itself (paths, the job name, ETP, sequence
parallelism). The result is what travels with the job as `recipe.yaml`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from launcher.errors import UserError
from launcher.schema import apply_overrides, build, choices, load_yaml


@dataclass
class MoeConfig:
    freeze_moe_router: bool = False
    # None: take the value from the model's config.json (router_aux_loss_coef, aux_loss_alpha).
    aux_loss_coeff: Optional[float] = None
    z_loss_coeff: Optional[float] = None
    # None: dropless routing. A number: each expert takes at most capacity x its fair share.
    capacity_factor: Optional[float] = None
    # Every expert gets exactly capacity tokens (short ones padded with tokens weighted zero):
    # the all-to-all's sizes are known before routing, so the host never waits to read them
    # (megatron-core's moe_pad_expert_input_to_capacity; needs capacity_factor).
    pad_to_capacity: bool = False
    token_dispatcher: str = choices("alltoall", "allgather", default="alltoall")
    # Benchmarking only: every token goes to random experts in equal numbers (megatron-core's
    # moe_router_force_load_balancing), so that speed does not depend on how balanced a
    # particular router is; what the model learns from such routing is of no use.
    force_load_balancing: bool = False


@dataclass
class OverrideConfig:
    moe_config: MoeConfig = field(default_factory=MoeConfig)


# megatron-core's linear layers a LoRA adapter may sit on (verl's names); "all-linear" is all of
# them but the router, which is adapted only when named.
LORA_MODULES = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "linear_q_proj", "linear_q_down_proj",
                "linear_q_up_proj", "linear_kv_down_proj", "linear_kv_up_proj", "router")


@dataclass
class LoraSection:
    rank: int = 0  # 0: full fine-tuning
    alpha: float = 32.0  # the adapter's output is scaled by alpha / rank
    dropout: float = 0.0  # on the adapter's input
    target_modules: list[str] = field(
        default_factory=lambda: ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"])
    # module names, or glob patterns over the module's path ("*.layers.0.*")
    exclude_modules: list[str] = field(default_factory=list)
    # routed experts: one A/B pair per expert, or one pair that every expert shares
    expert_adapters: str = choices("per_expert", "shared", default="per_expert")

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    def targets(self) -> set[str]:
        names = set(self.target_modules)
        if "all-linear" in names:
            names = (names - {"all-linear"}) | {m for m in LORA_MODULES if m != "router"}
        return names - {m for m in self.exclude_modules if "*" not in m}


@dataclass
class ModelSection:
    path: str  # a Hugging Face model folder holding config.json (and the tokenizer)
    tokenizer_path: Optional[str] = None  # default: path
    enable_gradient_checkpointing: bool = False
    # Train the config's multi-token-prediction layers (DeepSeek-V3: num_nextn_predict_layers);
    # their loss uses the same response-only mask, scaled by mtp_loss_scale.
    enable_mtp: bool = False
    mtp_loss_scale: float = 0.1
    override_config: OverrideConfig = field(default_factory=OverrideConfig)
    lora: LoraSection = field(default_factory=LoraSection)


@dataclass
class MultiturnSection:
    enable: bool = False
    messages_key: str = "messages"


@dataclass
class DataSection:
    train_files: list[str] = field(default_factory=list)
    val_files: list[str] = field(default_factory=list)
    prompt_key: str = "prompt"
    response_key: str = "response"
    multiturn: MultiturnSection = field(default_factory=MultiturnSection)
    max_length: int = 4096
    # What to do with a sample longer than max_length.
    truncation: str = choices("error", "left", "right", default="error")
    micro_batch_size: int = 1  # sequences per GPU per micro-batch
    global_batch_size: int = 128  # sequences per optimizer step, all GPUs together
    pack_sequences: bool = True
    skip_bad_rows: bool = False
    shuffle: bool = True
    # Processes per rank that tokenise rows beside the one that packs them (0: it tokenises alone).
    num_workers: int = 4
    # Options of the chat template passed to every rendering, for example enable_thinking: false.
    apply_chat_template_kwargs: Any = field(default_factory=dict)


@dataclass
class MegatronSection:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: Optional[int] = None  # default: tensor_model_parallel_size, as megatron-core
    context_parallel_size: int = 1
    sequence_parallel: Optional[bool] = None  # default: on whenever TP > 1 (MoE needs it)
    virtual_pipeline_model_parallel_size: Optional[int] = None
    num_layers_in_first_pipeline_stage: Optional[int] = None  # default: chosen when PP does not divide the layers
    num_layers_in_last_pipeline_stage: Optional[int] = None
    use_distributed_optimizer: bool = True
    param_offload: bool = False
    grad_offload: bool = False
    optimizer_offload: bool = False
    grad_reduce_in_fp32: bool = True  # false: bf16 gradient buffers (half the gradient memory)
    # Data-parallel gradient reduce launched bucket by bucket during the last micro-batch's
    # backward, and the distributed optimizer's parameter all-gather during the next forward
    # (megatron-core's DDP), instead of after and before them.
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    # Parameters per gradient-reduce bucket; None: megatron-core's max(40M, 1M x data-parallel size).
    # Smaller buckets start reducing earlier in the backward pass.
    ddp_bucket_size: Optional[int] = None
    # One micro-batch's expert-parallel all-to-all under another's compute: megatron-core's
    # combined forward-backward schedule (two micro-batches at a time, on two CUDA streams).
    overlap_moe_expert_parallel_comm: bool = False
    dist_checkpointing_path: Optional[str] = None  # initial weights, converted by `launcher convert`


@dataclass
class OptimSection:
    lr: float = 1e-5
    min_lr: float = 0.0
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    clip_grad: float = 1.0
    lr_warmup_steps_ratio: float = 0.0
    lr_scheduler: str = choices("cosine", "constant", "linear", default="cosine")


@dataclass
class TrainerSection:
    nnodes: int = 1
    n_gpus_per_node: int = 8  # on CPU: processes per node
    total_training_steps: Optional[int] = None  # default: total_epochs over the data
    total_epochs: int = 1
    save_freq: int = -1  # steps between checkpoints; -1: only at the end
    test_freq: int = -1  # steps between validation passes; -1: only at the end
    default_local_dir: Optional[str] = None  # checkpoints; default: RUN_DIR/checkpoints
    # Keep the newest N complete checkpoints (older ones go once a newer one is complete); None: all.
    max_ckpt_to_keep: Optional[int] = None
    # A checkpoint to resume from instead of `latest`, unless `latest` is newer and sound (after
    # a damaged checkpoint: the trainer names the one to give here).
    resume_from_path: Optional[str] = None
    seed: int = 42
    log_every: int = 1
    # How long a rank waits in a collective before the job fails (a hung or dead rank): well
    # under any time limit, above the slowest checkpoint save.
    collective_timeout_s: int = 600
    # Alerts in the log, metrics.jsonl and `launcher status`: a step's loss above this many times
    # the median of the steps before it; an MoE layer whose most loaded expert takes more than
    # this many times the mean.
    alert_loss_spike: float = 3.0
    alert_expert_imbalance: float = 4.0
    tensorboard: bool = False


@dataclass
class JobSection:
    name: Optional[str] = None  # default: the recipe's file name
    image: Optional[str] = None  # default: the cluster profile's image
    time_limit: str = "04:00:00"
    env: dict[str, str] = field(default_factory=dict)
    # Times a failed job goes again from its latest checkpoint (Slurm requeues it; 0: never).
    max_restarts: int = 2
    # Names of environment variables that hold secrets (HF_TOKEN, WANDB_API_KEY). Their values are
    # never written into a job spec, log or the job store: Slurm and local jobs inherit them from
    # the environment of `launcher submit`; Kubernetes jobs read the Secrets that the profile's
    # kubernetes.secrets names.
    secrets: list[str] = field(default_factory=list)


@dataclass
class Recipe:
    model: ModelSection
    data: DataSection = field(default_factory=DataSection)
    megatron: MegatronSection = field(default_factory=MegatronSection)
    optim: OptimSection = field(default_factory=OptimSection)
    trainer: TrainerSection = field(default_factory=TrainerSection)
    job: JobSection = field(default_factory=JobSection)
    # Free text: why this layout. Shown by `launcher plan`, never read by the trainer.
    notes: Optional[str] = None

    @property
    def world_size(self) -> int:
        return self.trainer.nnodes * self.trainer.n_gpus_per_node

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)


_TIME = re.compile(r"(\d+-)?\d{1,2}(:\d{2}){0,2}")


def load_recipe(path: str | Path, overrides: list[str] | tuple = ()) -> Recipe:
    """Read, override, check and resolve the recipe at `path`."""
    path = Path(path)
    data, lines = load_yaml(path)
    # PyYAML reads an unquoted 04:00:00 as a base-60 number of seconds; keep it as a time.
    job = data.get("job")
    if isinstance(job, dict) and isinstance(job.get("time_limit"), int) and not isinstance(job["time_limit"], bool):
        seconds = job["time_limit"]
        job["time_limit"] = f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
    apply_overrides(data, list(overrides))
    recipe = build(Recipe, data, path, lines)
    _resolve(recipe, path)
    _check(recipe, path, lines)
    return recipe


def _resolve(recipe: Recipe, path: Path) -> None:
    base = path.resolve().parent

    def absolute(p: Optional[str]) -> Optional[str]:
        if p is None or "://" in p:
            return p
        try:
            return str((base / Path(p).expanduser()).resolve())
        except RuntimeError:  # ~name of a user this machine does not know
            raise UserError(f"{path}: path {p!r}: no home folder for {p.split('/')[0]!r} on this machine; "
                            "write the full path") from None

    recipe.model.path = absolute(recipe.model.path)
    recipe.model.tokenizer_path = absolute(recipe.model.tokenizer_path) or recipe.model.path
    recipe.data.train_files = [absolute(p) for p in recipe.data.train_files]
    recipe.data.val_files = [absolute(p) for p in recipe.data.val_files]
    recipe.trainer.default_local_dir = absolute(recipe.trainer.default_local_dir)
    recipe.trainer.resume_from_path = absolute(recipe.trainer.resume_from_path)
    recipe.megatron.dist_checkpointing_path = absolute(recipe.megatron.dist_checkpointing_path)
    meg = recipe.megatron
    if meg.expert_tensor_parallel_size is None:
        meg.expert_tensor_parallel_size = meg.tensor_model_parallel_size
    if meg.sequence_parallel is None:
        meg.sequence_parallel = meg.tensor_model_parallel_size > 1
    recipe.job.name = sanitize_job_name(recipe.job.name or path.stem)


def _check(recipe: Recipe, path: Path, lines) -> None:
    """Checks on single values; the layout's rules live in launcher.plan.layout."""
    problems = []

    def bad(keys: str, message: str) -> None:
        line = lines.get(tuple(keys.split(".")))
        problems.append(f"{path}{':' + str(line) if line else ''}: {keys}: {message}")

    positive = {
        "trainer.nnodes": recipe.trainer.nnodes,
        "trainer.n_gpus_per_node": recipe.trainer.n_gpus_per_node,
        "data.max_length": recipe.data.max_length,
        "data.micro_batch_size": recipe.data.micro_batch_size,
        "data.global_batch_size": recipe.data.global_batch_size,
        "trainer.total_epochs": recipe.trainer.total_epochs,
        "trainer.log_every": recipe.trainer.log_every,
        "trainer.max_ckpt_to_keep": recipe.trainer.max_ckpt_to_keep,
        "trainer.collective_timeout_s": recipe.trainer.collective_timeout_s,
        "megatron.ddp_bucket_size": recipe.megatron.ddp_bucket_size,
    }
    for key, name in [("tensor_model_parallel_size", "megatron.tensor_model_parallel_size"),
                      ("pipeline_model_parallel_size", "megatron.pipeline_model_parallel_size"),
                      ("expert_model_parallel_size", "megatron.expert_model_parallel_size"),
                      ("expert_tensor_parallel_size", "megatron.expert_tensor_parallel_size"),
                      ("context_parallel_size", "megatron.context_parallel_size")]:
        positive[name] = getattr(recipe.megatron, key)
    for key, value in positive.items():
        if value is not None and value < 1:
            bad(key, f"{value} must be 1 or more")
    if recipe.data.num_workers < 0:
        bad("data.num_workers", f"{recipe.data.num_workers} must be 0 (tokenise in the data worker alone) or more")
    if recipe.job.max_restarts < 0:
        bad("job.max_restarts", f"{recipe.job.max_restarts} must be 0 (never) or more")
    if recipe.trainer.total_training_steps is not None and recipe.trainer.total_training_steps < 1:
        bad("trainer.total_training_steps", f"{recipe.trainer.total_training_steps} must be 1 or more, "
            "or left out to train for total_epochs")
    if recipe.megatron.param_offload:
        bad("megatron.param_offload", "true is not supported: every SFT step needs the weights on the GPU, so "
            "there is nothing to offload; use optimizer_offload (Adam states and master weights in host memory) "
            "and grad_offload")
    if recipe.megatron.overlap_param_gather and not recipe.megatron.use_distributed_optimizer:
        bad("megatron.overlap_param_gather", "true needs megatron.use_distributed_optimizer: true (only the "
            "distributed optimizer gathers parameters); set one or the other")
    moe = recipe.model.override_config.moe_config
    if moe.capacity_factor is not None and moe.capacity_factor <= 0:
        bad("model.override_config.moe_config.capacity_factor", f"{moe.capacity_factor} must be above 0 "
            "(1.0: each expert takes at most its even share of the tokens), or null for dropless routing")
    if moe.pad_to_capacity and moe.capacity_factor is None:
        bad("model.override_config.moe_config.pad_to_capacity", "true needs a capacity_factor (each expert is "
            "padded to that capacity; megatron-core's rule); set one, for example 1.25, or set pad_to_capacity false")
    if recipe.megatron.sequence_parallel and recipe.megatron.tensor_model_parallel_size == 1:
        bad("megatron.sequence_parallel", "true needs megatron.tensor_model_parallel_size > 1; set it to false")
    if not _TIME.fullmatch(recipe.job.time_limit):
        bad("job.time_limit", f"'{recipe.job.time_limit}' is not a Slurm time; write HH:MM:SS or D-HH:MM:SS")
    if recipe.optim.min_lr > recipe.optim.lr:
        bad("optim.min_lr", f"{recipe.optim.min_lr} is above optim.lr={recipe.optim.lr}; the schedule decays from "
            "lr down to min_lr, so set min_lr to at most lr")
    if len(recipe.optim.betas) != 2:
        bad("optim.betas", f"{recipe.optim.betas} needs two numbers, for example [0.9, 0.95]")
    kwargs = recipe.data.apply_chat_template_kwargs
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        bad("data.apply_chat_template_kwargs", f"{kwargs!r} is not a mapping of option names to values; "
            "write for example {enable_thinking: false}")
    for name in recipe.job.env:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            bad(f"job.env.{name}", "is not a valid environment variable name")
        elif looks_secret(name):
            bad(f"job.env.{name}", "looks like a secret, and job.env values are written into the job spec; "
                f"list {name} in job.secrets instead and set it in the environment of `launcher submit` "
                "(Kubernetes: the profile's kubernetes.secrets)")
    lora = recipe.model.lora
    if lora.rank < 0:
        bad("model.lora.rank", f"{lora.rank} must be 0 (full fine-tuning) or more")
    if not 0.0 <= lora.dropout < 1.0:
        bad("model.lora.dropout", f"{lora.dropout} must be at least 0 and below 1")
    valid = ", ".join((*LORA_MODULES, "all-linear"))
    for key in ("target_modules", "exclude_modules"):
        for name in getattr(lora, key):
            if name not in (*LORA_MODULES, "all-linear") and not (key == "exclude_modules" and "*" in name):
                bad(f"model.lora.{key}", f"'{name}' is not a module LoRA can adapt; valid: {valid}"
                    + (" (or a glob pattern over module paths, such as '*.layers.0.*')" if key == "exclude_modules"
                       else ""))
    if lora.enabled and not lora.targets():
        bad("model.lora.target_modules", "no module is left to adapt after exclude_modules")
    if lora.enabled and not recipe.megatron.dist_checkpointing_path:
        bad("model.lora.rank", "LoRA trains adapters on a base model: set megatron.dist_checkpointing_path to "
            "its megatron-core checkpoint (`launcher convert hf-to-mcore`)")
    for name in recipe.job.secrets:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            bad("job.secrets", f"'{name}' is not a valid environment variable name")
    if problems:
        raise UserError(*problems)


SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL", re.I)


def looks_secret(name: str) -> bool:
    """An environment variable whose name says it holds a credential (HF_TOKEN, WANDB_API_KEY)."""
    return bool(SECRET_NAME.search(name))


def sanitize_job_name(name: str) -> str:
    """A name safe in file names, Slurm and shells: letters, digits, '.', '_', '-' (63 at most)."""
    name = re.sub(r"-{2,}", "-", re.sub(r"[^A-Za-z0-9._-]+", "-", name))
    return name.strip("-._")[:63].strip("-._") or "job"


def time_limit_seconds(text: str) -> int:
    """Seconds in a Slurm time limit: MM, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS."""
    days = 0
    if "-" in text:
        d, text = text.split("-", 1)
        days = int(d)
        parts = [int(p) for p in text.split(":")] + [0, 0]
        h, m, s = parts[:3]
    else:
        parts = [int(p) for p in text.split(":")]
        h, m, s = {1: (0, parts[0], 0), 2: (0, *parts), 3: tuple(parts)}[len(parts)]
    return ((days * 24 + h) * 60 + m) * 60 + s
