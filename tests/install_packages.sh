#!/bin/bash
# Install Debian packages that a make target's tests start, when they are missing:
#   tests/install_packages.sh slurm-wlm munge     (make test-cluster)
#   tests/install_packages.sh chromium            (make test-browser)
#   tests/install_packages.sh qemu-user           (make test-isa)
set -euo pipefail
missing=()
for pkg in "$@"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
echo "installing ${missing[*]} from Debian's packages..."
$SUDO apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 || {
    $SUDO apt-get update -q >/dev/null
    $SUDO apt-get install -y -q "${missing[@]}" >/dev/null
}
