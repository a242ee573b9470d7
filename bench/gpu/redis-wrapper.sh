#!/bin/sh
# Template: prepare.sh writes this as redis/redis-server, redis/run-redis-server and
# redis/redis-cli, filling in the binary's name (in bin/) and the newest glibc symbol version
# that the bundle uses.
# Runs the bundled binary with the libraries of lib/ on LD_LIBRARY_PATH. Where the system
# glibc is older than that version (or REDIS_BUNDLE_GLIBC=1), it runs under the bundled glibc
# of glibc/, through that glibc's own loader, instead.
d=$(dirname "$(readlink -f "$0")")
need=@NEED@
have=$(getconf GNU_LIBC_VERSION 2>/dev/null | awk '{print $2}')
if [ -z "${REDIS_BUNDLE_GLIBC:-}" ] && [ -n "$have" ] &&
    [ "$(printf '%s\n%s\n' "$need" "$have" | sort -V | head -n 1)" = "$need" ]; then
    LD_LIBRARY_PATH="$d/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$d/bin/@REAL@" "$@"
fi
exec "$d/glibc/ld-linux-x86-64.so.2" --library-path "$d/lib:$d/glibc" "$d/bin/@REAL@" "$@"
