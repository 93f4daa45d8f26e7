#!/usr/bin/env bash
# Installs the host packages moat needs, only those that are missing. Idempotent; needs root.
set -euo pipefail

need=()
have() { command -v "$1" >/dev/null 2>&1; }

export DEBIAN_FRONTEND=noninteractive
apt_update_once() {
  if [ -z "${_moat_apt_updated:-}" ]; then
    apt-get update -qq
    _moat_apt_updated=1
  fi
}

# QEMU first and on its own: on machines that carry a newer qemu-utils from backports, apt
# replaces it with the matching 7.2 one only when qemu-system-x86 is installed alone.
if ! have qemu-system-x86_64; then
  apt_update_once
  apt-get install -y -qq qemu-system-x86 >/dev/null
fi
have qemu-img || need+=(qemu-utils)
have mkfs.ext4 || need+=(e2fsprogs)
have debugfs || need+=(e2fsprogs)
have mmdebstrap || need+=(mmdebstrap)
have docker-registry || need+=(docker-registry)
# Test images carry the host's busybox into guests, so it must be the static build.
if [ ! -x /bin/busybox ] || ldd /bin/busybox >/dev/null 2>&1; then need+=(busybox-static); fi
have htpasswd || need+=(apache2-utils)
have dpkg-deb || need+=(dpkg)
# moat-net's tests put a real guest in a network namespace (ip netns, a TAP) and run curl there.
have ip || need+=(iproute2)
have curl || need+=(curl)
# The Python SDK's tests (crates/cli/tests/sdk_python.rs) make a virtualenv: Debian splits
# venv and ensurepip into python3-venv.
have python3 || need+=(python3)
_venv_probe=$(mktemp -d)
python3 -m venv "$_venv_probe/v" >/dev/null 2>&1 || need+=(python3-venv)
rm -rf "$_venv_probe"

if [ ${#need[@]} -gt 0 ]; then
  apt_update_once
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# `moat setup` downloads the guest kernel with apt-get download, which needs package lists.
if ! ls /var/lib/apt/lists/*_Packages >/dev/null 2>&1 || ! apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1; then
  apt_update_once
fi
