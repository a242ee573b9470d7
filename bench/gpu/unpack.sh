#!/usr/bin/env bash
# Runs ON the lent GPU machine, from the repo root (where device commands start).
#
#   bash bench/gpu/unpack.sh           copy the part(s) this call carried to /root/gw
#   bash bench/gpu/unpack.sh install   the same, then unpack all parts, install the wheels
#                                      into /root/site, check redis-server, write /root/gw/env.sh
#   bash bench/gpu/unpack.sh env       print the exports (after install)
#
# A call carries one part (carry: [".gpuwheels/partNN", ".gpuwheels/SHA256SUMS"]); carrying
# replaces .gpuwheels/ in the checkout there, so each call copies what arrived into /root/gw,
# which lasts while the machine stays warm (30 s idle, 30 min held at most).
# GW_DIR, SITE_DIR and PYTHON override /root/gw, /root/site and python3 (for trying it elsewhere).
set -euo pipefail

GW=${GW_DIR:-/root/gw}
SITE=${SITE_DIR:-/root/site}
PYTHON=${PYTHON:-python3}
mode=${1:-copy}

mkdir -p "$GW"
shopt -s nullglob
arrived=(.gpuwheels/part* .gpuwheels/SHA256SUM[S])
if ((${#arrived[@]})); then
    cp "${arrived[@]}" "$GW/"
    echo "copied: ${arrived[*]##*/}"
else
    echo "no .gpuwheels/part* in this checkout"
fi
have=("$GW"/part*)
echo "in $GW: ${#have[@]} part(s): $(cd "$GW" && echo part*)"
if [[ -f $GW/SHA256SUMS ]]; then
    missing=$(cd "$GW" && awk '{print $2}' SHA256SUMS | while read -r p; do [[ -f $p ]] || echo "$p"; done)
    if [[ -n $missing ]]; then
        echo "still missing: $(echo $missing)"
    else
        echo "all $(wc -l <"$GW/SHA256SUMS") parts present"
    fi
fi

write_env() {
    cat >"$GW/env.sh" <<EOF
# source from the repo root: . $GW/env.sh
export PYTHONPATH=$SITE:\$PWD\${PYTHONPATH:+:\$PYTHONPATH}
export PATH=$GW/redis:$SITE/bin:\$PATH
export VLLM_USE_FLASHINFER_SAMPLER=0
export HF_HUB_OFFLINE=1
EOF
}

case $mode in
copy) exit 0 ;;
env)
    [[ -f $GW/env.sh ]] || { echo "not installed yet: run with 'install'" >&2; exit 1; }
    cat "$GW/env.sh"
    exit 0
    ;;
install) ;;
*) echo "usage: $0 [install|env]" >&2; exit 2 ;;
esac

if [[ -f $GW/SHA256SUMS ]]; then
    (cd "$GW" && sha256sum --quiet -c SHA256SUMS) || { echo "parts missing or damaged" >&2; exit 1; }
fi
rm -rf "$GW/whl" "$GW/redis"
cat "$GW"/part* | tar xf - -C "$GW"
echo "unpacked: $(ls "$GW"/whl/*.whl | wc -l) wheels, $(ls "$GW"/whl/ifmissing/*.whl 2>/dev/null | wc -l) if-missing wheels, redis/"

# whl/ifmissing: only what the machine's own python lacks (never shadow its numpy/pillow)
all=("$GW"/whl/*.whl)
for w in "$GW"/whl/ifmissing/*.whl; do
    name=$(basename "$w" | cut -d- -f1)
    if ver=$(env -u PYTHONPATH "$PYTHON" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$name" 2>/dev/null); then
        echo "machine has $name $ver: skip $(basename "$w")"
    else
        echo "machine lacks $name: install $(basename "$w")"
        all+=("$w")
    fi
done
# one pip run for all: with --target, a second run would replace shared folders such as bin/
rm -rf "$SITE"
PIP_ROOT_USER_ACTION=ignore "$PYTHON" -m pip install -q --no-index --no-deps --no-compile \
    --target "$SITE" "${all[@]}"
echo "installed into $SITE: $(ls -d "$SITE"/*.dist-info | wc -l) distributions"

write_env
# shellcheck disable=SC1091
. "$GW/env.sh"
echo "redis-server on PATH: $(command -v redis-server)"
"$GW/redis/run-redis-server" --version
redis-server --version
"$PYTHON" -c 'import redis, celery, typer, rich, matplotlib, prometheus_client, pydantic_settings, dotenv; print("imports ok: redis", redis.__version__, "celery", celery.__version__, "matplotlib", matplotlib.__version__)'
if "$PYTHON" -c 'import torch' 2>/dev/null; then
    "$PYTHON" -c 'import vllm, torch; print("vllm", vllm.__version__, "torch", torch.__version__)'
else
    echo "no torch in $PYTHON: vllm import not checked"
fi
echo
echo "export these (or: . $GW/env.sh):"
grep "^export" "$GW/env.sh"
