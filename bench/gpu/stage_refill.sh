#!/usr/bin/env bash
# Refill latency and free-slot steps by batch size (issue 19), and what checkpoints cost
# (issue 15), on one GPU after unpack.sh install. Results land in $OUT/refill/ (summaries,
# plots; raw/ holds each run's step log, read log (the refill breakdown's input) and logs).
#   bash bench/gpu/stage_refill.sh 256    # 256 slots: offline; slotfill (checkpoints on, the
#                     # default 1000 ms, ids read from vLLM's output processor); slotfill with
#                     # checkpoints off; slotfill with checkpoints from intermediate outputs
#   bash bench/gpu/stage_refill.sh 512    # 512 slots: offline; slotfill (16,384 batched tokens)
#   bash bench/gpu/stage_refill.sh 1024   # 1,024 slots: offline; slotfill
#   bash bench/gpu/stage_refill.sh all    # 256 and 1,024
# Four engine starts at 256 and two at 1,024 (each ~35-85 s, plus its run): run the parts as
# two device calls. Request counts: N256 (default 1500), N512 (default 3000), N1024 (default 4000). VARIANTS: the
# 256-slot checkpoint variants to run (default "ckpt0 ckpt-outputs"; "" runs none). Each run prints
# "refill breakdown ..." lines; the JSON rows carry them under refill_breakdown.
set -uo pipefail
cd "$(dirname "$0")/../.."
. /root/gw/env.sh
export PYTHONUNBUFFERED=1 COLUMNS=${COLUMNS:-200}  # an 80-column console cut the tables on the H200
OUT=${OUT:-/tmp/out}
R="$OUT/refill"
mkdir -p "$R"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$R/card.txt"
part=${1:-all}

sweep() {  # sweep NAME SLOTS BATCHED_TOKENS REQUESTS MODES [extra flags]
  local name=$1 slots=$2 btok=$3 n=$4 modes=$5
  shift 5
  python3 -m bench \
    --model bench/gpu/llama-3.1-8b-shape --load-format dummy --skip-tokenizer-init \
    --max-num-seqs "$slots" --max-num-batched-tokens "$btok" --max-model-len 2048 \
    --gpu-memory-utilization 0.88 --requests "$n" --prompt-tokens 256 \
    --min-output 32 --max-output 512 --seed 0 --modes "$modes" --sizes "$slots" \
    --admission adaptive --no-submit --soak-jobs 0 \
    --results-dir "$R" --out "$R/$name" "$@" 2>&1 | tee "$R/$name.log" | tail -25
}

case "$part" in 256|512|1024|all) ;; *) echo "unknown part $part (256, 512, 1024 or all)"; exit 2 ;; esac
if [ "$part" = 512 ]; then
  sweep sizes-512 512 16384 "${N512:-3000}" offline,slotfill
elif [ "$part" != 1024 ]; then
  sweep sizes-256 256 8192 "${N256:-1500}" offline,slotfill
  case " ${VARIANTS-ckpt0 ckpt-outputs} " in *" ckpt0 "*)
    sweep sizes-256-ckpt0 256 8192 "${N256:-1500}" slotfill --checkpoint-interval-ms 0 ;; esac
  case " ${VARIANTS-ckpt0 ckpt-outputs} " in *" ckpt-outputs "*)
    sweep sizes-256-ckpt-outputs 256 8192 "${N256:-1500}" slotfill --checkpoint-outputs ;; esac
fi
if [ "$part" = 1024 ] || [ "$part" = all ]; then
  sweep sizes-1024 1024 16384 "${N1024:-4000}" offline,slotfill
fi
grep -h "refill breakdown" "$R"/*.log
