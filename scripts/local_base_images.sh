#!/usr/bin/env bash
# For machines that reach no container registry (podman): the base images compose.yaml and
# Dockerfile.cpu name, built locally from Debian packages. Each is built only when missing.
#   localhost/debian:bookworm          debootstrap --variant=minbase (MIRROR), podman import
#   python:3.11-slim-bookworm          + python3 python3-pip python3-venv python3-dev (Debian's
#                                      3.11; the official image has the headers too, and vLLM's
#                                      CPU build compiles against Python.h at start)
#   docker.io/library/redis:7.4        + Debian's redis-server (7.0: what compose.yaml needs)
set -euo pipefail
MIRROR=${MIRROR:-http://deb.debian.org/debian}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
have() { podman image exists "$1"; }

if ! have localhost/debian:bookworm; then
  command -v debootstrap >/dev/null || { echo "local_base_images: apt-get install debootstrap" >&2; exit 1; }
  echo "local_base_images: debootstrap bookworm from $MIRROR (a few minutes) ..."
  debootstrap --variant=minbase bookworm "$work/rootfs" "$MIRROR" > "$work/debootstrap.log" 2>&1 \
    || { tail -n 20 "$work/debootstrap.log" >&2; exit 1; }
  tar -C "$work/rootfs" -c . | podman import - localhost/debian:bookworm >/dev/null
fi
if ! have python:3.11-slim-bookworm || \
   ! podman run --rm python:3.11-slim-bookworm test -f /usr/include/python3.11/Python.h; then
  cat > "$work/Containerfile.python" <<'CF'
FROM localhost/debian:bookworm
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-pip python3-venv \
      python3-dev ca-certificates && rm -rf /var/lib/apt/lists/* /usr/lib/python3.11/EXTERNALLY-MANAGED \
 && ln -s /usr/bin/python3 /usr/local/bin/python
CF
  podman build --network host -q -t python:3.11-slim-bookworm -f "$work/Containerfile.python" "$work" >/dev/null
fi
if ! have docker.io/library/redis:7.4; then
  cat > "$work/Containerfile.redis" <<'CF'
FROM localhost/debian:bookworm
RUN apt-get update && apt-get install -y --no-install-recommends redis-server \
 && rm -rf /var/lib/apt/lists/* && mkdir -p /data /usr/local/etc/redis
WORKDIR /data
CMD ["redis-server"]
CF
  podman build --network host -q -t docker.io/library/redis:7.4 -f "$work/Containerfile.redis" "$work" >/dev/null
fi
echo "local_base_images: $(podman images --format '{{.Repository}}:{{.Tag}}' | grep -E 'debian|python|redis' | tr '\n' ' ')"
