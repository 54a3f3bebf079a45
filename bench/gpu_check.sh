#!/usr/bin/env bash
# Every GPU check of the open targets in one call (budget: ~8 minutes on one H200):
#   bash bench/gpu_check.sh [OUT_DIR]          # OUT_DIR defaults to $OUT, else bench/results/gpu
# 1. bench/scoring.py    --device cuda, 0.5B-shaped random Qwen2 (target >= 200x per-item generate)
# 2. bench/generation.py --device cuda, batch 16 vs one at a time (target >= 10x)
# 3. bench/train_memory.py --device cuda, 152k vocabulary, 4 x 1024-token prompts (KD <= 1.1x CE-only)
# 4. main.py on the demo with --gpus_to_use 0: one iteration through the GPU code paths
#    (bf16 scoring and generation, accelerate launch with CUDA_VISIBLE_DEVICES, bf16 training)
# Each part's output goes to OUT_DIR/<part>.log; a failing part does not stop the others; the
# exit status is the number of failed parts.
set -u
cd "$(dirname "$0")/.."
out="${1:-${OUT:-bench/results/gpu}}"
demo="${TMPDIR:-/tmp}/atkd_gpu_demo"  # outside OUT_DIR: only logs, JSON and the report travel back
mkdir -p "$out"
rm -rf "$demo"
stamp="$out/.started"
touch "$stamp"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
failed=0
part() {  # part NAME COMMAND...: run, log, count failures
    local name=$1; shift
    echo "== $name: $*"
    local start=$SECONDS
    if ! "$@" >"$out/$name.log" 2>&1; then failed=$((failed + 1)); echo "   FAILED (see $out/$name.log)"; fi
    tail -n 12 "$out/$name.log"
    echo "   $((SECONDS - start)) s"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"
part scoring python -m bench.scoring --device cuda --model_size 0.5b --batch_size 64 --n_items 256
part generation python -m bench.generation --device cuda --model_size 0.5b
part train_memory python -m bench.train_memory --device cuda --vocab 151936 --prompt_len 1024 --batch_size 4 \
    --hidden 896 --layers 24 --repeats 1
part demo_gpu python main.py --gpus_to_use 0 --num_iterations 1 \
    --dataset_files_per_iteration data/demo/iteration_1.jsonl \
    --ability_class_files_per_iteration data/demo/iteration_1_ability_paths.jsonl \
    --workflow_output_dir "$demo/workflow" --models_output_dir "$demo/models"
# only the JSON these runs wrote (bench/results may hold older CPU figures)
find bench/results -maxdepth 1 -name '*.json' -newer "$stamp" -exec cp {} "$out/" \; 2>/dev/null
cp "$demo/workflow/report.md" "$out/demo_report.md" 2>/dev/null || true
rm -f "$stamp"
echo "failed parts: $failed"
exit "$failed"
