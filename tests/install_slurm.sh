#!/usr/bin/env bash
# Installs what tests/slurm_cluster.py starts (Debian's slurmctld, slurmd, slurm-client and munge
# packages) where it may: as root with apt-get, unless GENBENCH_NO_SLURM is set. It starts no
# daemon: the tests start their own, in a folder of their own, and stop them. Elsewhere it says
# why not, and the SLURM tests skip.
set -uo pipefail
have() { command -v "$1" >/dev/null || [ -x "/usr/sbin/$1" ]; }
if have slurmctld && have slurmd && have munged && have sbatch; then exit 0; fi
if [ -n "${GENBENCH_NO_SLURM:-}" ]; then
  echo "GENBENCH_NO_SLURM is set: the SLURM tests skip"; exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "SLURM is not installed and this is not root with apt-get: the SLURM tests skip"; exit 0
fi
echo "installing SLURM for its tests (Debian packages slurmctld slurmd slurm-client munge)"
packages="slurmctld slurmd slurm-client munge"
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -qq $packages >/dev/null 2>&1 \
  || { apt-get update -qq && apt-get install -y -qq $packages >/dev/null; } \
  || echo "the SLURM packages did not install: the SLURM tests skip"
exit 0
