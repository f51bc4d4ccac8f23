#!/usr/bin/env bash
# What the container test needs from Debian: podman with runc, netavark with
# aardvark-dns and iptables (containers find each other by name: Debian's podman only
# recommends them, and --no-install-recommends leaves CNI without DNS), and
# debootstrap for the base image (no registry is reachable from this kind of
# machine). podman-compose comes from PyPI with the project's dev extra.
set -euo pipefail
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo -n"
packages="podman runc netavark aardvark-dns debootstrap iptables uidmap"
missing=""
for p in $packages; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
[ -z "$missing" ] && exit 0
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null \
  || { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null; }
