#!/usr/bin/env bash
# Issue 17's GPU stages (text mode, two GPUs, tensor parallel). Runs on the lent machine after
# `bash bench/gpu/unpack.sh install`; one or more stages per device call, each a
# `python -m bench` run writing to $OUT/<stage>/: gpu-<stage>.json/.png, bench.log,
# command.txt (with the wall time) and raw.tgz (logs, step logs, per-request records).
#
#   bash bench/gpu/session.sh STAGE[@GPUS] [STAGE[@GPUS] ...]
#
# Stages given together run at the same time, each with CUDA_VISIBLE_DEVICES=GPUS (default:
# the stage's own, below), so stages on different GPUs share one call:
#   bash bench/gpu/session.sh text@0 text-ids@1
#
#   text          GPU 0    Llama-2-7B shape, 32k BPE tokenizer: text prompts of ~256 tokens,
#                          detokenized output; offline, slotfill, slotfill streaming (50 ms)
#   text-ids      GPU 1    the same model and lengths with token-id prompts, no tokenizer
#                          (offline, slotfill): what text costs, beside `text`
#   two-gpu       GPUs 0,1 Llama-3.1-8B shape, 6,000 requests: offline (one GPU, every
#                          request), offline_split (one engine per GPU, each over its half,
#                          at once), then two workers on one queue, one per GPU, fixed and
#                          adaptive admission
#   two-gpu-mixed GPUs 0,1 the same with 15 % prompts of 1,500 tokens (4,800 requests)
#   two-gpu-engine GPUs 0,1 uniform, engine-aware admission (fleet) beside fixed
#   tp2           GPUs 0,1 Llama-3.1-8B shape, tensor_parallel_size 2: offline vs slotfill
#
# Overrides: REQUESTS=N (every stage's request count), MODES=... (the stage's modes),
# EXTRA="..." (more bench flags), DRY_RUN=1 (print the commands only), SLOTFILL_GIT_COMMIT=<sha> (meta.git where the copied tree
# has no git of its own).
set -uo pipefail
cd "$(dirname "$0")/../.."
[ -f /root/gw/env.sh ] && . /root/gw/env.sh
export PYTHONUNBUFFERED=1 COLUMNS=200
OUT=${OUT:-/tmp/out}
WORK=${WORK:-/tmp/slotfill-session}  # the bench's raw files; only an archive goes to $OUT
mkdir -p "$OUT" "$WORK"
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader \
  > "$OUT/card.txt" 2>/dev/null

M8B=bench/gpu/llama-3.1-8b-shape
M7B=bench/gpu/llama-2-7b-text
# The reference workload (../shared/gpu/README.md): 256-token prompts, U(32,512) out, 256 slots.
BASE=(--load-format dummy --max-num-seqs 256 --max-num-batched-tokens 8192
      --max-model-len 2048 --gpu-memory-utilization 0.88 --prompt-tokens 256
      --min-output 32 --max-output 512 --seed 0 --no-submit --soak-jobs 0)

stage_args() {  # stage name, its GPUs -> the bench flags (one per line)
  local gpus=$2
  case "$1" in
    text) printf '%s\n' --model "$M7B" --text --requests "${REQUESTS:-3000}" \
            --modes "${MODES:-offline,slotfill,stream@50}" ;;
    text-ids) printf '%s\n' --model "$M7B" --skip-tokenizer-init --requests "${REQUESTS:-3000}" \
            --modes "${MODES:-offline,slotfill}" ;;
    two-gpu|two-gpu-mixed|two-gpu-engine)
      local modes=offline,offline_split,fleet_fixed,fleet_adaptive n=6000
      # Long prompts slow every mode (~1.3x, issue 17): fewer requests keep it under 9 min.
      if [ "$1" = two-gpu-mixed ]; then n=4800; fi
      if [ "$1" = two-gpu-engine ]; then modes=offline,offline_split,fleet_fixed,fleet; fi
      printf '%s\n' --model "$M8B" --skip-tokenizer-init --requests "${REQUESTS:-$n}" \
        --gpus "$gpus" --modes "${MODES:-$modes}"
      if [ "$1" = two-gpu-mixed ]; then printf '%s\n' --long-share 0.15 --long-prompt-tokens 1500; fi
      ;;
    tp2) printf '%s\n' --model "$M8B" --skip-tokenizer-init --requests "${REQUESTS:-3000}" \
            --tensor-parallel-size 2 --modes "${MODES:-offline,slotfill}" ;;
    *) return 1 ;;
  esac
}

default_gpus() {
  case "$1" in text) echo 0 ;; text-ids) echo 1 ;; *) echo 0,1 ;; esac
}

run_stage() {  # stage, GPUs
  local stage=$1 gpus=$2 dir="$OUT/$1" work="$WORK/$1" args
  mkdir -p "$dir" "$work"
  mapfile -t args < <(stage_args "$stage" "$gpus")
  # shellcheck disable=SC2086 # EXTRA is a list of flags
  echo "[$stage] CUDA_VISIBLE_DEVICES=$gpus python3 -m bench ${args[*]} ${EXTRA:-}" \
    | tee "$dir/command.txt"
  [ -n "${DRY_RUN:-}" ] && return 0
  if [ "$stage" = text ]; then  # the machine's own tokenizers/transformers load ours, or fail now
    python3 -c "import sys, tokenizers, transformers as t; tok = t.AutoTokenizer.from_pretrained(
'$M7B'); print('tokenizers', tokenizers.__version__, 'transformers', t.__version__,
len(tok), tok.encode('Redis streams'))" 2>&1 | tail -3 | tee "$dir/tokenizer-check.txt"
  fi
  local t0=$SECONDS
  CUDA_VISIBLE_DEVICES=$gpus python3 -m bench "${BASE[@]}" "${args[@]}" ${EXTRA:-} \
    --results-dir "$work" --out "$dir/gpu-$stage" > "$dir/bench.log" 2>&1
  local rc=$?
  echo "[$stage] exit $rc after $((SECONDS - t0)) s" | tee -a "$dir/command.txt"
  # Logs, step logs, per-request records, series: one archive (the private Redis's files stay).
  tar czf "$dir/raw.tgz" --exclude=redis -C "$work" raw 2>/dev/null
  ls -l "$dir" | sed "s/^/[$stage] /"
  tail -45 "$dir/bench.log" | sed "s/^/[$stage] /"
  return $rc
}

[ $# -ge 1 ] || { sed -n 2,28p "$0"; exit 2; }
pids=()
for spec in "$@"; do
  stage=${spec%%@*}
  gpus=$(default_gpus "$stage")
  [ "$spec" != "$stage" ] && gpus=${spec#*@}
  stage_args "$stage" "$gpus" > /dev/null || { echo "unknown stage $stage"; exit 2; }
  run_stage "$stage" "$gpus" &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=1; done
exit $rc
