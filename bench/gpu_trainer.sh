#!/bin/bash
# The trainer on one GPU: the tiny recipe and a mid-size Qwen3-MoE at sequence 4096.
# LAYOUTS="ep2 cp2 tp2 pp2" instead runs the mid-size model on two GPUs in those layouts
# (LAYOUTS=offload: on one GPU with optimizer_offload).
# Run on the device machine from the repository root, with megatron-core's cp312 wheel in
# .whl/ (see bench/README.md); writes metrics and a summary under $OUT (or bench/out).
set -uo pipefail
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, megatron.core; print('torch', torch.__version__, 'megatron-core', megatron.core.__version__)" | tee -a "$OUT/gpu.txt"
run() {  # name recipe overrides...  (NPROC processes, default 1)
    local name=$1 recipe=$2; shift 2
    local dir=/tmp/bench-$name
    rm -rf "$dir"; mkdir -p "$dir"
    python3 -c "import sys; from launcher.recipe import load_recipe; r = load_recipe(sys.argv[1], sys.argv[3:]); open(sys.argv[2], 'w').write(r.to_yaml())" \
        "$recipe" "$dir/recipe.yaml" "trainer.default_local_dir=$dir/checkpoints" "$@"
    timeout 400 python3 -m torch.distributed.run --standalone --nproc-per-node="${NPROC:-1}" -m trainer --config "$dir/recipe.yaml" \
        > "$OUT/$name.log" 2>&1
    echo "$name exit $?"
    cp "$dir/metrics.jsonl" "$OUT/$name.metrics.jsonl" 2>/dev/null
    tail -3 "$OUT/$name.log"
}
if [ -n "${LAYOUTS:-}" ]; then
    NPROC=2
    two=(trainer.n_gpus_per_node=2 megatron.expert_model_parallel_size=1)
    for layout in $LAYOUTS; do
        case $layout in
            ep2) run mid_ep2 bench/qwen3_moe_mid.yaml trainer.n_gpus_per_node=2 megatron.expert_model_parallel_size=2 ;;
            cp2) run mid_cp2 bench/qwen3_moe_mid.yaml "${two[@]}" megatron.context_parallel_size=2 ;;
            tp2) run mid_tp2_etp1 bench/qwen3_moe_mid.yaml "${two[@]}" megatron.tensor_model_parallel_size=2 \
                     megatron.expert_tensor_parallel_size=1 ;;
            pp2) run mid_pp2 bench/qwen3_moe_mid.yaml "${two[@]}" megatron.pipeline_model_parallel_size=2 ;;
            offload) NPROC=1 run mid_optimizer_offload bench/qwen3_moe_mid.yaml megatron.optimizer_offload=true ;;
        esac
    done
    python3 bench/summarize.py "$OUT" | tee "$OUT/summary.json"
    exit 0
fi
[ "${ONLY_MID:-0}" = 1 ] || run tiny recipes/tiny_moe.yaml trainer.n_gpus_per_node=1 megatron.expert_model_parallel_size=1 trainer.total_training_steps=40 data.max_length=1024 data.global_batch_size=8 data.micro_batch_size=2
run mid bench/qwen3_moe_mid.yaml
[ "${ONLY_MID:-0}" = 1 ] || run mid_recompute bench/qwen3_moe_mid.yaml model.enable_gradient_checkpointing=true
python3 bench/summarize.py "$OUT" | tee "$OUT/summary.json"
