#!/usr/bin/env bash
# Runs on the lent GPU machine after unpack.sh install (bench/gpu/README.md): latency under
# live load, `vllm serve` next to slotfill (client -> Redis -> worker), one H200, < 8 min.
#
#   CUDA_VISIBLE_DEVICES=1 bash bench/gpu/stage_latency.sh [extra `python -m bench latency` flags]
#
# The Llama-3.1-8B-shaped config with random weights and token-id prompts (no tokenizer:
# --skip-tokenizer-init, so the gateway, whose chunks are text, is left out). Budget seen on
# paper: offline capacity run (first engine start on a fresh machine ~85 s, then 600
# requests), then per system one engine start (~40 s once vLLM's compile cache is warm), a
# warm-up, six 12 s levels and a 6 s burst, each followed by its drain. Results in
# $OUT/latency/: gpu-latency.json (summary), .md (table), .png (plot), logs and per-request
# samples under raw/, and the whole console output in bench.log.
# CAPACITY=<req/s> skips the offline run (saves an engine start) and uses that figure.
set -uo pipefail
cd "$(dirname "$0")/../.."
. /root/gw/env.sh
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
dest="$OUT/latency"
mkdir -p "$dest"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$dest/card.txt"
# Both servers' request logs off; the bench prints one line per level.
timeout 470 python3 -m bench latency \
  --model bench/gpu/llama-3.1-8b-shape --load-format dummy --skip-tokenizer-init \
  --max-num-seqs 256 --max-num-batched-tokens 8192 --max-model-len 2048 \
  --gpu-memory-utilization 0.88 --prompt-tokens 256 --min-output 32 --max-output 256 \
  --seed 0 --systems serve,slotfill --loads 25,50,75,90,100,120 --seconds 12 \
  --burst 200:6 --capacity "${CAPACITY:-0}" --capacity-requests 600 --warmup 64 \
  --drain-timeout 60 --results-dir "$dest" --out "$dest/gpu-latency" "$@" 2>&1 \
  | tee "$dest/bench.log" | grep -v -e '^\s*$' | tail -60
rc=${PIPESTATUS[0]}
# Keep what comes back small: the per-request samples are the largest files.
du -sh "$dest" 2>/dev/null
exit "$rc"
