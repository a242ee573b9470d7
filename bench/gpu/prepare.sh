#!/usr/bin/env bash
# Build what the lent GPU machine needs (wheels + a redis-server bundle) and split it into
# parts of 60 MiB under .gpuwheels/, one part per device call. Run from the repo root:
#
#   bash bench/gpu/prepare.sh
#
# Environment overrides:
#   DEVICE_WHEELS       package list (default ../shared/gpu/device-wheels.txt, relative to the root)
#   EXTRA_WHEELS        extra pins (default bench/gpu/extra-wheels.txt)
#   IFMISSING_WHEELS    pins installed there only if absent (default bench/gpu/ifmissing-wheels.txt)
#   GPU_SCRATCH         scratch dir outside the repo (default /tmp/slotfill-gpu)
#   PYTHON              python that runs pip download (default python3; any version works)
#   PART_SIZE           split size (default 60m)
set -euo pipefail

ROOT=$(git rev-parse --show-toplevel 2>/dev/null || pwd)
cd "$ROOT"
HERE=bench/gpu
DEVICE_WHEELS=${DEVICE_WHEELS:-../shared/gpu/device-wheels.txt}
EXTRA_WHEELS=${EXTRA_WHEELS:-$HERE/extra-wheels.txt}
IFMISSING_WHEELS=${IFMISSING_WHEELS:-$HERE/ifmissing-wheels.txt}
SCRATCH=${GPU_SCRATCH:-/tmp/slotfill-gpu}
PYTHON=${PYTHON:-python3}
PART_SIZE=${PART_SIZE:-60m}
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
           manylinux_2_27_x86_64 manylinux_2_31_x86_64 manylinux1_x86_64)

log() { printf '\n== %s\n' "$*"; }

for f in "$DEVICE_WHEELS" "$EXTRA_WHEELS" "$IFMISSING_WHEELS"; do
    [[ -f $f ]] || { echo "missing list: $f" >&2; exit 1; }
done
case $(realpath -m "$SCRATCH")/ in
    "$ROOT"/*) echo "GPU_SCRATCH must lie outside the repo" >&2; exit 1 ;;
esac

# a. keep the parts out of git (they travel only through `carry`)
log "git exclude"
EXCLUDE=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$EXCLUDE")"
touch "$EXCLUDE"
if ! grep -qxF '/.gpuwheels/' "$EXCLUDE"; then
    echo '/.gpuwheels/' >>"$EXCLUDE"
    echo "added /.gpuwheels/ to $EXCLUDE"
else
    echo "/.gpuwheels/ already in $EXCLUDE"
fi

# b. wheels: one version of each package, for CPython 3.12 on x86-64 Linux
log "wheel lists"
mkdir -p "$SCRATCH/whl/ifmissing"
"$PYTHON" "$HERE/wheelset.py" merge "$DEVICE_WHEELS" "$EXTRA_WHEELS" "$IFMISSING_WHEELS" "$SCRATCH"

pip_download() {  # DEST REQFILE
    local plat=()
    for p in "${PLATFORMS[@]}"; do plat+=(--platform "$p"); done
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp "${plat[@]}" -d "$1" -r "$2"
}
log "pip download (existing wheels in $SCRATCH/whl are reused)"
pip_download "$SCRATCH/whl" "$SCRATCH/req-main.txt"
pip_download "$SCRATCH/whl/ifmissing" "$SCRATCH/req-ifmissing.txt"
"$PYTHON" "$HERE/wheelset.py" prune "$SCRATCH/whl" "$SCRATCH/req-main.txt"
"$PYTHON" "$HERE/wheelset.py" prune "$SCRATCH/whl/ifmissing" "$SCRATCH/req-ifmissing.txt"
"$PYTHON" "$HERE/wheelset.py" check "$SCRATCH/whl" "$SCRATCH/whl/ifmissing"
"$PYTHON" "$HERE/wheelset.py" unmet "$SCRATCH/whl" "$SCRATCH/whl/ifmissing" >"$SCRATCH/unmet.txt"
echo "requirements no carried wheel provides: $SCRATCH/unmet.txt ($(grep -c '^  ' "$SCRATCH/unmet.txt") lines)"

# c. redis-server (+ redis-cli) from this Debian 12 machine, with the libraries it links to
log "redis bundle"
if ! command -v redis-server >/dev/null; then
    apt-get update -qq && apt-get install -y -qq --no-install-recommends redis-server
fi
RB=$SCRATCH/redis
rm -rf "$RB"
mkdir -p "$RB/bin" "$RB/lib" "$RB/glibc"
bins=("$(readlink -f "$(command -v redis-server)")")
cp "${bins[0]}" "$RB/bin/redis-server.real"
if command -v redis-cli >/dev/null; then
    bins+=("$(readlink -f "$(command -v redis-cli)")")
    cp "${bins[1]}" "$RB/bin/redis-cli.real"
fi
# lib/ (put on LD_LIBRARY_PATH) gets every linked library except glibc's own pieces, which
# come from the GPU machine's glibc. A copy of this machine's glibc goes to glibc/, used
# (through its own loader) only where the GPU machine's glibc is older than the bundle needs.
GLIBC_RE='^(libc|libm|libmvec|libpthread|libdl|librt|libresolv|libutil|libnsl|libanl|libBrokenLocale|ld-linux-x86-64|linux-vdso)\.so'
while read -r lib; do
    base=$(basename "$lib")
    if [[ $base =~ $GLIBC_RE ]]; then
        cp -L "$lib" "$RB/glibc/$base"
    else
        cp -L "$lib" "$RB/lib/$base"
    fi
done < <(ldd "${bins[@]}" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\/.*ld-linux/ {print $1}' | sort -u)
[[ -f $RB/glibc/ld-linux-x86-64.so.2 ]] || { echo "no ld-linux-x86-64.so.2 found" >&2; exit 1; }
glibc_need=$({ objdump -T "$RB"/bin/* "$RB"/lib/* 2>/dev/null || true; } | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -n 1 || true)
glibc_need=${glibc_need#GLIBC_}
[[ -n $glibc_need ]] || glibc_need=99  # unknown: always run under the bundled glibc
write_wrapper() {  # NAME REAL
    sed -e "s/@REAL@/$2/g" -e "s/@NEED@/$glibc_need/g" "$HERE/redis-wrapper.sh" >"$RB/$1"
    chmod +x "$RB/$1"
}
write_wrapper redis-server redis-server.real
write_wrapper run-redis-server redis-server.real
if [[ -f $RB/bin/redis-cli.real ]]; then write_wrapper redis-cli redis-cli.real; fi
echo "lib/:   $(cd "$RB/lib" && echo *)"
echo "glibc/: $(cd "$RB/glibc" && echo *) (fallback only)"
echo "uses the GPU machine's glibc if >= $glibc_need, else the bundled $(getconf GNU_LIBC_VERSION)"
# every library must resolve from lib/ or from glibc
stray=$(LD_LIBRARY_PATH="$RB/lib" ldd "$RB"/bin/* | grep -F '=>' \
    | grep -vE "=> $RB/lib/|=> (/usr)?/lib(64)?/x86_64-linux-gnu/(libc|libm|libmvec|libpthread|libdl|librt|libresolv)\.so" || true)
if [[ -n $stray ]]; then
    echo "libraries resolved outside the bundle:" >&2
    echo "$stray" >&2
    exit 1
fi
env -i "$RB/redis-server" --version
env -i REDIS_BUNDLE_GLIBC=1 "$RB/redis-server" --version
env -i REDIS_BUNDLE_GLIBC=1 "$RB/redis-cli" --version

# d. one tar, split into parts
log "parts"
mkdir -p .gpuwheels
rm -f .gpuwheels/part* .gpuwheels/SHA256SUMS
(cd "$SCRATCH" && tar cf - whl redis) | split -b "$PART_SIZE" -d - .gpuwheels/part
(cd .gpuwheels && sha256sum part* >SHA256SUMS)

# e. report
ls -l .gpuwheels
nparts=$(find .gpuwheels -name 'part*' | wc -l)
total=$(cat .gpuwheels/part* | wc -c)
echo "$nparts parts, $total bytes ($((total / 1048576)) MiB) in all"
# what else travels with each call: tracked + untracked-not-ignored files
tree=$({ git ls-files -z -co --exclude-standard | xargs -0 -r stat -c %s -- 2>/dev/null || true; } | awk '{s+=$1} END {print s+0}')
biggest=$(stat -c %s .gpuwheels/part00)
echo "working tree that travels with each call: $tree bytes; largest part + tree: $((biggest + tree)) of 67108864"
if ((biggest + tree > 67108864)); then
    echo "WARNING: a part plus the working tree exceeds 64 MiB; lower PART_SIZE" >&2
fi
