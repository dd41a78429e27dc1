#!/bin/bash
# Install what make test-cluster starts, from Debian's packages, when it is missing: SLURM's
# controller, node daemon and client commands (slurm-wlm) and munge (the package creates its key).
set -euo pipefail
if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
    && command -v munged >/dev/null && [ -f /etc/munge/munge.key ]; then
    exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
echo "installing slurm-wlm and munge from Debian's packages..."
$SUDO apt-get install -y -q slurm-wlm munge >/dev/null 2>&1 || {
    $SUDO apt-get update -q >/dev/null
    $SUDO apt-get install -y -q slurm-wlm munge >/dev/null
}
command -v slurmctld >/dev/null && command -v munged >/dev/null
