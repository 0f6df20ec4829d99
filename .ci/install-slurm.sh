#!/usr/bin/env bash
# Install a single-node SLURM (Debian's slurm-wlm + munge) for the `slurm` tests; run as root.
# Idempotent: does nothing when the daemons and client tools are already installed.
# No service is started: a policy-rc.d that exits 101 stops the packages' init scripts, and the
# test (tests/slurm_cluster.py) starts munged, slurmctld and slurmd itself with its own config.
set -euo pipefail

need=(slurmctld slurmd sbatch squeue scontrol scancel munged)
missing=0
for exe in "${need[@]}"; do
  command -v "$exe" >/dev/null 2>&1 || [ -x "/usr/sbin/$exe" ] || missing=1
done
if [ "$missing" -eq 0 ]; then
  echo "install-slurm: slurm-wlm and munge already installed"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install-slurm: must run as root to apt-get install slurm-wlm munge" >&2
  exit 2
fi

policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\n# installed by nvmeta .ci/install-slurm.sh: do not start services during apt-get\nexit 101\n' >"$policy"
  chmod 755 "$policy"
  created_policy=1
fi
cleanup() { if [ "$created_policy" -eq 1 ]; then rm -f "$policy"; fi; }
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
echo "install-slurm: installed $(dpkg-query -W -f='slurm-wlm ${Version}' slurm-wlm), $(dpkg-query -W -f='munge ${Version}' munge)"
