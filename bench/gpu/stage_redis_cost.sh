#!/usr/bin/env bash
# Redis commands and Redis CPU per job (issue 13), before and after, on the machine that runs
# this (issue 17: the GPU box's CPU; no GPU is used): `python -m slotfill.testing.redis_cost`
# with one simulated worker, run alternately on this checkout ("new") and on an older tree
# ("base", unpacked from BASE_TAR, made here with `git archive`), ROUNDS rounds.
#   git archive -o .gpuwheels/base.tar a01ac2c      # here, before the device call
#   bash bench/gpu/stage_redis_cost.sh .gpuwheels/base.tar
# -> $OUT/redis-cost/<who>[-<flag>].<round>.json, index.txt (each run's 1-minute load before it)
set -uo pipefail
cd "$(dirname "$0")/../.."
[ -f /root/gw/env.sh ] && . /root/gw/env.sh
BASE_TAR=${1:?a tar of the base tree (git archive)}
OUT=${OUT:-/tmp/out}
R="$OUT/redis-cost"
BASE=$(mktemp -d /tmp/rcost-base.XXXX)
mkdir -p "$R"
tar xf "$BASE_TAR" -C "$BASE"
PY=${PYTHON:-python3}
SITE=${PYTHONPATH:-}
run() {  # who dir round [flag]
  local who=$1 dir=$2 round=$3 flag=${4:-} name
  name="$who${flag:+-${flag#--}}.$round"
  echo "$name load=$(cut -d' ' -f1 /proc/loadavg)" >> "$R/index.txt"
  (cd "$dir" && PYTHONPATH="${SITE:+$SITE:}$dir" timeout 300 "$PY" -m slotfill.testing.redis_cost \
    --jobs "${JOBS:-4000}" $flag > "$R/$name.json" 2> "$R/$name.err")
}
for round in $(seq 1 "${ROUNDS:-3}"); do
  run base "$BASE" "$round"
  run new "$PWD" "$round"
  run new "$PWD" "$round" --wait-many
  run base "$BASE" "$round" --single
  run new "$PWD" "$round" --single
  run base "$BASE" "$round" --stream
  run new "$PWD" "$round" --stream
done
nproc > "$R/nproc.txt"
grep -h "model name" /proc/cpuinfo | head -1 >> "$R/nproc.txt"
for f in "$R"/*.json; do
  printf '%s ' "$(basename "$f")"
  "$PY" -c "import json,sys; d=json.load(open(sys.argv[1])); print(d['all_commands_per_job'], d['redis_cpu_usec_per_job'])" "$f" 2>/dev/null || echo failed
done
