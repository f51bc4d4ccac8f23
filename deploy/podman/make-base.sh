#!/usr/bin/env bash
# A base image for Leadflow's containers made without any registry: Debian bookworm
# from debootstrap (Debian's own mirror), imported into podman, with Python 3.11,
# Redis 7 and Prometheus from Debian's packages. Idempotent: an existing image is kept.
#   deploy/podman/make-base.sh            # as root, after deploy/podman/setup.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
image=${LEADFLOW_BASE_IMAGE:-localhost/leadflow-base:bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
export CONTAINERS_CONF=${CONTAINERS_CONF:-$here/containers.conf}
if podman image exists "$image"; then
  echo "$image: already made"
  exit 0
fi
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
echo "debootstrap bookworm into $root (a minute or two)"
debootstrap --variant=minbase \
  --include=python3,python3-venv,ca-certificates,redis-server,prometheus \
  bookworm "$root" "$mirror" >"$root.log" 2>&1 || { tail -20 "$root.log"; exit 1; }
rm -f "$root.log"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | podman import --change 'CMD ["/bin/bash"]' - "$image" >/dev/null
echo "$image: made"
