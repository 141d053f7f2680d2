#!/bin/bash
# tiny_moe: rendered by moe-launcher 0.1.0 from recipes/tiny_moe.yaml for cluster local.
# Layout: world 2 = TP1 x CP1 x DP2 x PP1; experts ETP1 x EP2 x EDP1 x PP1; 0.5 of 8 GiB per process
set -uo pipefail

RUN_DIR=@HOME@/moe-runs/tiny_moe
mkdir -p "$RUN_DIR/logs"

cat > "$RUN_DIR/recipe.yaml" <<'MOE_LAUNCHER_RECIPE_END'
# Resolved by moe-launcher 0.1.0 from recipes/tiny_moe.yaml for cluster local.
model:
  path: @REPO@/recipes/models/tiny_moe
  tokenizer_path: @REPO@/recipes/models/tiny_moe
  enable_gradient_checkpointing: false
  enable_mtp: false
  mtp_loss_scale: 0.1
  override_config:
    moe_config:
      freeze_moe_router: false
      aux_loss_coeff: null
      z_loss_coeff: null
      capacity_factor: null
      pad_to_capacity: false
      token_dispatcher: alltoall
      force_load_balancing: false
  lora:
    rank: 0
    alpha: 32.0
    dropout: 0.0
    target_modules:
    - linear_qkv
    - linear_proj
    - linear_fc1
    - linear_fc2
    exclude_modules: []
    expert_adapters: per_expert
data:
  train_files:
  - @REPO@/recipes/data/tiny_sft.parquet
  val_files:
  - @REPO@/recipes/data/tiny_sft_val.parquet
  prompt_key: prompt
  response_key: response
  multiturn:
    enable: false
    messages_key: messages
  max_length: 128
  truncation: error
  micro_batch_size: 4
  global_batch_size: 16
  pack_sequences: true
  skip_bad_rows: false
  shuffle: true
  num_workers: 4
  apply_chat_template_kwargs: {}
megatron:
  tensor_model_parallel_size: 1
  pipeline_model_parallel_size: 1
  expert_model_parallel_size: 2
  expert_tensor_parallel_size: 1
  context_parallel_size: 1
  sequence_parallel: false
  virtual_pipeline_model_parallel_size: null
  num_layers_in_first_pipeline_stage: null
  num_layers_in_last_pipeline_stage: null
  use_distributed_optimizer: true
  param_offload: false
  grad_offload: false
  optimizer_offload: false
  grad_reduce_in_fp32: true
  overlap_grad_reduce: false
  overlap_param_gather: false
  ddp_bucket_size: null
  overlap_moe_expert_parallel_comm: false
  dist_checkpointing_path: null
optim:
  lr: 0.003
  min_lr: 0.0003
  weight_decay: 0.0
  betas:
  - 0.9
  - 0.95
  clip_grad: 1.0
  lr_warmup_steps_ratio: 0.05
  lr_scheduler: cosine
trainer:
  nnodes: 1
  n_gpus_per_node: 2
  total_training_steps: 60
  total_epochs: 1
  save_freq: 30
  test_freq: 20
  default_local_dir: @HOME@/moe-runs/tiny_moe/checkpoints
  max_ckpt_to_keep: null
  resume_from_path: null
  seed: 42
  log_every: 5
  collective_timeout_s: 600
  alert_loss_spike: 3.0
  alert_expert_imbalance: 4.0
  tensorboard: false
job:
  name: tiny_moe
  image: null
  time_limit: 00:15:00
  env:
    OMP_NUM_THREADS: '1'
  max_restarts: 2
  secrets: []
notes: 'Two CPU processes: expert parallelism EP=2 over gloo, attention data-parallel
  DP=2.'
MOE_LAUNCHER_RECIPE_END

export PYTHONUNBUFFERED=1
export OMP_NUM_THREADS=1
# Every metrics record names the job it came from (the launcher's id: this script's pid).
export MOE_JOB_ID="local-$$"

rm -f "$RUN_DIR/exit_code"
status=0
python3 -m torch.distributed.run \
    --standalone \
    --nnodes=1 \
    --nproc-per-node=2 \
    -m trainer --config "$RUN_DIR/recipe.yaml" || status=$?
echo "$status" > "$RUN_DIR/exit_code"
exit "$status"
