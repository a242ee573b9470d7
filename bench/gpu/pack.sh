#!/usr/bin/env bash
# Run one stage command with its results going to a scratch folder, then pack that folder
# into ONE archive under $OUT: the device machine brings back at most 8 files per call (16 MiB
# each), so loose stage outputs (JSONs, plots, logs, raw/) would be cut.
#   bash bench/gpu/pack.sh NAME bash bench/gpu/stage_refill.sh 256
# -> $OUT/NAME.tgz (the stage's $OUT contents and its console log NAME.log; redis dirs and
#    files over 4 MiB left out; raw/ too if the archive would pass 15 MB) and the console's last 60 lines on stdout.
set -uo pipefail
name=$1
shift
REAL_OUT=${OUT:-/tmp/out}
SCRATCH=/tmp/pack/$name
mkdir -p "$SCRATCH" "$REAL_OUT"
OUT=$SCRATCH "$@" > "$SCRATCH/$name.log" 2>&1
rc=$?
echo "[$name] exit $rc" >> "$SCRATCH/$name.log"
tar czf "$REAL_OUT/$name.tgz" --exclude=redis --exclude='*.rdb' \
  $(cd "$SCRATCH" && find . -type f -size +4M -printf '--exclude=%P ') -C "$SCRATCH" .
if [ "$(stat -c %s "$REAL_OUT/$name.tgz")" -gt 15000000 ]; then  # over the 16 MiB a file
  echo "[$name] archive over 15 MB: packed again without raw/ and raw.tgz" >> "$SCRATCH/$name.log"
  tar czf "$REAL_OUT/$name.tgz" --exclude=redis --exclude='*.rdb' --exclude=raw \
    --exclude=raw.tgz -C "$SCRATCH" .
fi
tail -60 "$SCRATCH/$name.log"
ls -l "$REAL_OUT/$name.tgz"
exit $rc
