#!/usr/bin/env bash
# On a machine with GPUs: FSDP2 bf16 training for a few steps on every GPU, a resume, sampling, evaluation and
# two GRPO steps on several processes. Exits non-zero on the first failure; without a GPU it says so and exits 0.
#   bash scripts/gpu_smoke.sh [output folder, default runs/gpu-smoke]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs/gpu-smoke}"

gpus=$(python -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
if [ "$gpus" -lt 1 ]; then
  echo "gpu_smoke: no CUDA GPU here (torch.cuda.is_available() is False); nothing to do"
  exit 0
fi
if [ "$gpus" -ge 2 ]; then
  dist="fsdp"; launch=(torchrun --standalone --nproc_per_node "$gpus")
else
  echo "gpu_smoke: one GPU: FSDP needs two processes, so this runs one process (--distributed none)"
  dist="none"; launch=(python)
fi
common=(--output-dir "$out/train" --hidden-size 256 --num-layers 4 --num-heads 4 --seq-len 128 --batch-size 8
        --precision bf16 --distributed "$dist" --eval-every 10 --save-every 10 --num-samples 2 --progress false)

echo "== train 20 of 30 steps ($dist, $gpus GPUs, bf16)"
"${launch[@]}" scripts/train.py "${common[@]}" --max-steps 30 --stop-after-steps 20
echo "== resume to step 30"
"${launch[@]}" scripts/train.py "${common[@]}" --max-steps 30 --resume auto
echo "== sample from the consolidated model"
ddlm-generate --model "$out/train/final" --prompt "HAMLET:" --length 32 --sampling-steps 32
echo "== evaluate"
ddlm-eval ppl --model "$out/train/final" --max-blocks 16 --num-points 4 --no-progress
echo "== two GRPO steps"
if [ "$gpus" -ge 2 ]; then
  torchrun --standalone --nproc_per_node 2 scripts/grpo.py --output-dir "$out/rl" --max-steps 2 --sft-steps 20 \
    --prompts-per-step 2 --group-size 4 --eval-prompts 16 --progress false
else
  ddlm-rl --output-dir "$out/rl" --max-steps 2 --sft-steps 20 --prompts-per-step 2 --group-size 4 --eval-prompts 16 \
    --progress false
fi
echo "gpu_smoke: all passed"
