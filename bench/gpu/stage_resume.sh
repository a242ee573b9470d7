#!/usr/bin/env bash
# Issue 15's kill figures on the GPU: one long job (3,000 tokens; TOKENS="3000 3900" for more, ignore_eos) on a
# Llama-2-7B-shaped model with dummy weights, SIGKILLed at ~75 % of its tokens; a peer worker
# on the same GPU (each engine takes 0.4 of its memory) finishes it: resume (checkpoints every
# 1,000 ms) vs restart (checkpoints off). Writes $OUT/resume/kill.jsonl.
#   CUDA_VISIBLE_DEVICES=1 bash bench/gpu/stage_resume.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
[ -f /root/gw/env.sh ] && . /root/gw/env.sh
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT/resume"
for tokens in ${TOKENS:-3000}; do
  python3 -m bench.resume kill --engine vllm --model bench/gpu/llama-2-7b-text \
    --load-format dummy --max-model-len 4096 --tokens "$tokens" --share 0.75 --repeat 1 \
    2>&1 | tee -a "$OUT/resume/kill.log" | grep '^{' >> "$OUT/resume/kill.jsonl"
done
cat "$OUT/resume/kill.jsonl"
