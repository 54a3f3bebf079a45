#!/usr/bin/env bash
# Every GPU check of the open targets in one call (budget: under 8 minutes on one H200):
#   bash bench/gpu_check.sh [OUT_DIR]          # OUT_DIR defaults to $OUT, else bench/results/gpu
#   CPU_DRY_RUN=1 bash bench/gpu_check.sh DIR  # the same parts at small sizes on the CPU: proves the script
#   PARTS="demo_gpu fsdp2_gpu" bash bench/gpu_check.sh  # only the named parts (a rerun after a cut-off call)
# 1. scoring      bench/scoring.py, 0.5B-shaped random Qwen2: items/s against per-item generate
#                 (target >= 200x) and achieved TFLOP/s as a share of the FLOP limit (target >= 45%)
# 2. generation   bench/generation.py, batch 16 against one at a time (target >= 10x)
# 3. train_memory bench/train_memory.py, 152k vocabulary, 4 x 1024-token prompts (KD step <= 1.1x CE-only)
# 4. train_step   bench/train_step.py, 0.5B shape, bf16 autocast: a full and a LoRA step, time and peak memory
# 5. demo_gpu     main.py on the demo with --gpus_to_use 0: one iteration through the GPU code paths
#                 (bf16 scoring and generation, accelerate launch with CUDA_VISIBLE_DEVICES, bf16 training)
# 6. fsdp2_gpu    train.py under configs/accelerate/fsdp2.yaml (one process) on the demo's iteration-1
#                 data: sharded checkpoint, gathered final_model, then inference.py scores it
# 7. zero3_gpu    the same under configs/accelerate/zero3.yaml, when deepspeed is installed (else skipped)
# Each part's output goes to OUT_DIR/<part>.log; a failing part does not stop the others; the exit
# status is the number of failed parts. Without CUDA (and without CPU_DRY_RUN) each CUDA part fails
# at once with "torch sees no CUDA device" and the training parts are refused (no sharding on a CPU).
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
part() {  # part NAME COMMAND...: run, log, count failures (only the parts PARTS names, when set)
    local name=$1; shift
    case " ${PARTS:-$name} " in *" $name "*) ;; *) return 0 ;; esac
    echo "== $name: $*"
    local start=$SECONDS
    if ! "$@" >"$out/$name.log" 2>&1; then failed=$((failed + 1)); echo "   FAILED (see $out/$name.log)"; fi
    tail -n 12 "$out/$name.log"
    echo "   $((SECONDS - start)) s"
}
if [ "${CPU_DRY_RUN:-0}" = 1 ]; then  # small sizes, the CPU, two gloo processes for the sharded parts
    export OMP_NUM_THREADS=1
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the launch shim runs train.py by path: atkd from here
    dev=cpu; gpus=""; nproc=2
    scoring=(--model_size 11m --batch_size 16 --n_items 32 --threads 1)
    generation=(--model_size 11m --new_tokens 16 --threads 1)
    memory=(--vocab 8000 --prompt_len 128 --batch_size 2 --hidden 128 --layers 2 --repeats 1)
    step=(--model_size 11m --prompt_len 128 --steps 2 --warmup 1 --threads 1)
    demo_args=(--num_distill_samples 60 --train_epochs 1)
    launch_args=(--mixed_precision no tests/sharded_on_cpu.py)  # lifts accelerate's GPU-only gate (see the file)
else
    dev=cuda; gpus=0; nproc=1
    scoring=(--model_size 0.5b --batch_size 64 --n_items 256)
    generation=(--model_size 0.5b)
    memory=(--vocab 151936 --prompt_len 1024 --batch_size 4 --hidden 896 --layers 24 --repeats 1)
    step=(--model_size 0.5b)
    demo_args=()
    launch_args=()
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"
part scoring python -m bench.scoring --device "$dev" "${scoring[@]}"
part generation python -m bench.generation --device "$dev" "${generation[@]}"
part train_memory python -m bench.train_memory --device "$dev" "${memory[@]}"
part train_step python -m bench.train_step --device "$dev" "${step[@]}"
part demo_gpu python main.py --gpus_to_use "$gpus" --num_iterations 1 \
    --dataset_files_per_iteration data/demo/iteration_1.jsonl \
    --ability_class_files_per_iteration data/demo/iteration_1_ability_paths.jsonl \
    --workflow_output_dir "$demo/workflow" --models_output_dir "$demo/models" "${demo_args[@]}"
sharded() {  # sharded CONFIG NAME: train.py under an example accelerate config on the demo's iteration-1 data
    local it="$demo/workflow/iteration_1"
    python -m accelerate.commands.launch --config_file "configs/accelerate/$1" --num_processes "$nproc" \
        --main_process_port $((29500 + RANDOM % 1000)) "${launch_args[@]}" train.py \
        --student_model_path data/demo/models/student --train_file_path "$it/D_validated_data/validated.jsonl" \
        --teacher_logits_dir "$it/E_teacher_logits" --output_dir "$demo/$2" --num_epochs 2 --learning_rate 1e-3 \
        --batch_size 8 --gradient_accumulation_steps 2 --save_steps 5 --seed 0 || return 1
    ls "$demo/$2" "$demo/$2"/checkpoint-* | head -40
    python inference.py --model_path "$demo/$2/final_model" --dataset_path data/demo/eval.jsonl \
        --output_path "$demo/$2/eval/replies.jsonl" --gpu_ids "$gpus" || return 1
    python -c "import json, sys; print('eval accuracy', json.load(open(sys.argv[1]))['accuracy'])" \
        "$demo/$2/eval/summary.json"
}
part fsdp2_gpu sharded fsdp2.yaml fsdp2
if python -c "import deepspeed" 2>/dev/null; then
    part zero3_gpu sharded zero3.yaml zero3
else
    echo "== zero3_gpu: skipped: deepspeed is not installed (pip install deepspeed, then rerun)" | tee "$out/zero3_gpu.log"
fi
# only the JSON these runs wrote (bench/results may hold older CPU figures)
find bench/results -maxdepth 1 -name '*.json' -newer "$stamp" -exec cp {} "$out/" \; 2>/dev/null
cp "$demo/workflow/report.md" "$out/demo_report.md" 2>/dev/null || true
rm -f "$stamp"
echo "failed parts: $failed"
exit "$failed"
