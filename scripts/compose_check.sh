#!/usr/bin/env bash
# `make compose-check`: compose.yaml for real. Builds the CPU worker image, brings up `redis` and
# `worker-cpu` (no .env: the generated tiny model), submits a job from the host, checks its
# result, then stops the worker with a drain (SIGTERM, exit 0) and takes everything down.
#
#   scripts/compose_check.sh [--offline] [--keep]
#
# Docker (with `docker compose` or `docker-compose`) where a Docker engine answers, else podman +
# podman-compose. --offline is for machines that reach no container registry (podman only):
# base images are built locally from Debian packages (debootstrap), podman runs with runc and
# explicit nofile/nproc limits, and pip inside the build gets the host's CA bundle and its local
# wheel directory (WHEELS, default /opt/wheels). --keep leaves the containers running.
set -euo pipefail
cd "$(dirname "$0")/.."
offline=0 keep=0
for arg in "$@"; do
  case "$arg" in
    --offline) offline=1 ;;
    --keep) keep=1 ;;
    *) echo "usage: $0 [--offline] [--keep]" >&2; exit 2 ;;
  esac
done
PROJECT=slotfill-check
PY=${PYTHON:-.venv/bin/python}
WHEELS=${WHEELS:-/opt/wheels}
START_TIMEOUT_S=${START_TIMEOUT_S:-1200}
mkdir -p .compose-check
log() { echo "[compose-check +${SECONDS}s] $*"; }
die() { echo "[compose-check +${SECONDS}s] FAILED: $*" >&2; exit 1; }
host_cli() { PYTHONPATH=$PWD "$PY" -m slotfill "$@"; }

# -- which container engine ---------------------------------------------------------------
if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
  E=docker
  if docker compose version >/dev/null 2>&1; then COMPOSE=(docker compose); else COMPOSE=(docker-compose); fi
elif command -v podman >/dev/null 2>&1 && command -v podman-compose >/dev/null 2>&1; then
  E=podman COMPOSE=(podman-compose)
else
  die "neither a Docker engine nor podman + podman-compose (pip install podman-compose) found"
fi
[ "$offline" = 0 ] || [ "$E" = podman ] || die "--offline needs podman"
log "engine: $E; compose: ${COMPOSE[*]} ($("${COMPOSE[@]}" version 2>/dev/null | tail -1))"

build_args=()
if [ "$offline" = 1 ]; then
  if [ -z "${CONTAINERS_CONF:-}" ]; then
    # crun cannot set rlimits in some sandboxes; runc with explicit limits can.
    export CONTAINERS_CONF=$PWD/.compose-check/containers.conf
    mkdir -p .compose-check
    printf '[containers]\ndefault_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]\n[engine]\nruntime = "runc"\n' \
      > "$CONTAINERS_CONF"
  fi
  bash scripts/local_base_images.sh
  ca=$(dirname "$(readlink -f /etc/ssl/certs/ca-certificates.crt)")
  pip_env="PIP_CERT=/host-ca/ca-certificates.crt"
  build_args+=(--network host -v "$ca:/host-ca:ro" --build-arg TORCH_CPU_INDEX=)
  if [ -d "$WHEELS" ]; then
    build_args+=(-v "$WHEELS:/host-wheels:ro")
    pip_env="$pip_env PIP_FIND_LINKS=/host-wheels"
  fi
  build_args+=(--build-arg "PIP_ENV=$pip_env")
fi

# -- build, up ----------------------------------------------------------------------------
log "building slotfill-worker-cpu:latest from Dockerfile.cpu (first time: many minutes)"
$E build "${build_args[@]}" -f Dockerfile.cpu -t slotfill-worker-cpu:latest . > .compose-check/build.log 2>&1 \
  || { tail -n 30 .compose-check/build.log >&2; die "image build (log: .compose-check/build.log)"; }
log "image built: $($E image inspect slotfill-worker-cpu:latest --format '{{.Size}}' | awk '{printf "%.1f GB", $1/1e9}')"

port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export REDIS_HOST_PORT=$port
url="redis://127.0.0.1:$port/0"
compose() { "${COMPOSE[@]}" -p "$PROJECT" --profile cpu "$@"; }
cleanup() {
  if [ "$keep" = 0 ]; then
    log "taking the fleet down"
    compose down -v >/dev/null 2>&1 || true
  else
    log "--keep: left running (Redis on $url); stop with: ${COMPOSE[*]} -p $PROJECT --profile cpu down -v"
  fi
}
trap cleanup EXIT
trap "exit 130" INT TERM
log "compose up redis worker-cpu (Redis published on 127.0.0.1:$port)"
compose up -d --no-build redis worker-cpu > .compose-check/up.log 2>&1 \
  || { tail -n 30 .compose-check/up.log >&2; die "compose up (log: .compose-check/up.log)"; }
worker=$($E ps -a -q --filter "label=com.docker.compose.project=$PROJECT" \
         --filter "label=com.docker.compose.service=worker-cpu" | head -1)
[ -n "$worker" ] || die "no worker-cpu container"

# -- wait for the worker's heartbeat --------------------------------------------------------
next_note=30
while true; do
  if host_cli status --redis-url "$url" --json 2>/dev/null \
      | "$PY" -c 'import json, sys; sys.exit(0 if any(q["workers"] for q in json.load(sys.stdin)) else 1)'; then
    break
  fi
  [ "$SECONDS" -lt "$START_TIMEOUT_S" ] || { $E logs --tail 30 "$worker" >&2; die "no worker heartbeat after ${START_TIMEOUT_S}s"; }
  if [ "$SECONDS" -ge "$next_note" ]; then
    log "waiting for the worker: $($E inspect -f '{{.State.Status}} (restarts {{.RestartCount}})' "$worker"); $($E logs --tail 1 "$worker" 2>&1 | cut -c1-100)"
    next_note=$((SECONDS + 30))
  fi
  sleep 2
done
log "worker up: $($E logs "$worker" 2>&1 | grep -m1 'engine ready' | sed 's/^.*engine ready/engine ready/')"

# -- one job from the host ----------------------------------------------------------------
result=$(host_cli submit "hello from the host" --max-tokens 8 --wait --timeout 300 --redis-url "$url") \
  || die "the job did not succeed: $result"
echo "$result" | "$PY" -c 'import json, sys; r = json.load(sys.stdin); assert r["status"] == "succeeded" and r["usage"]["completion_tokens"] == 8, r; print("[compose-check] job", r["id"], r["status"], r["usage"]["completion_tokens"], "tokens by", r["worker"])'
COLUMNS=80 host_cli status --redis-url "$url" | sed -n '1,12p'

# -- stop with a drain --------------------------------------------------------------------
t0=$SECONDS
$E stop -t 45 "$worker" >/dev/null
code=$($E inspect -f '{{.State.ExitCode}}' "$worker")
log "worker stopped in $((SECONDS - t0))s, exit code $code: $($E logs "$worker" 2>&1 | grep -m1 'drained' | sed 's/^.*slotfill.worker: //')"
[ "$code" = 0 ] || die "the worker did not drain cleanly (exit $code)"
log "OK: redis + worker-cpu from compose.yaml served a job from the host and drained"
