#!/usr/bin/env bash
# Runs on the lent GPU machine after unpack.sh install: one stage per device call (each call
# is limited to 10 minutes). Results land in $OUT (the device tool brings them back).
#   bash bench/gpu/run.sh tests     real-engine e2e tests + a kill -9 fault test on the GPU
#   bash bench/gpu/run.sh bench MODES [extra bench flags]   e.g. offline,slotfill
set -uo pipefail
cd "$(dirname "$0")/../.."
. /root/gw/env.sh
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/card.txt"
stage=${1:?stage}
shift
case "$stage" in
  tests)
    # Several engines may share the card during a test session (the session's worker and a
    # fault test's own): each takes a slice of its memory.
    export SLOTFILL_GPU_MEMORY_UTILIZATION=${SLOTFILL_GPU_MEMORY_UTILIZATION:-0.3}
    python3 -m pytest -q -p no:cacheprovider "$@" 2>&1 | tee "$OUT/tests.log" | tail -40
    ;;
  bench)
    modes=${1:?modes}
    name=${modes//[,@]/-}  # the device tool brings back only plain file names
    shift
    # The reference workload of ../shared/gpu/README.md on a Llama-3.1-8B-shaped config.
    python3 -m bench \
      --model bench/gpu/llama-3.1-8b-shape --load-format dummy --skip-tokenizer-init \
      --max-num-seqs 256 --max-num-batched-tokens 8192 --max-model-len 2048 \
      --gpu-memory-utilization 0.88 --requests 3000 --prompt-tokens 256 \
      --min-output 32 --max-output 512 --seed 0 --modes "$modes" \
      --results-dir "$OUT" --out "$OUT/gpu-${name}" "$@" 2>&1 | tee "$OUT/bench-${name}.log" | tail -60
    ;;
  *) echo "unknown stage $stage"; exit 2 ;;
esac
