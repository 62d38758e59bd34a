#!/bin/bash
# Install what tests/test_slurm.py needs on a Debian (or Ubuntu) machine: Debian's slurm-wlm
# (slurmctld, slurmd, the client commands, the basic plugins) and munge; and iproute2, whose
# `ip` makes the test hosts (network namespaces) of tests/test_hosts.py and
# tests/test_slurm_hosts.py (a fresh Debian image lacks it). Idempotent: when they are there
# it only says so. Runs as root (CI) or through sudo.
#
#   .ci/install-slurm.sh && FMNIST_ACCEL_REQUIRE_SLURM=1 python -m pytest tests/test_slurm.py
#
# The packages' own services are not started (the tests run their own daemons, with their own
# configuration, from tests/support/slurm_cluster.py), and nothing under /etc is configured.
set -euo pipefail

PACKAGES=(slurm-wlm munge iproute2)
PROGRAMS=(slurmctld slurmd munged sbatch srun scontrol squeue scancel sinfo ip)

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }
have_programs() {
    local p
    for p in "${PROGRAMS[@]}"; do
        PATH=$PATH:/usr/sbin:/sbin command -v "$p" >/dev/null || return 1
    done
}

missing=()
for pkg in "${PACKAGES[@]}"; do
    installed "$pkg" || missing+=("$pkg")
done
if ((${#missing[@]} == 0)) && have_programs; then
    echo "install-slurm: ${PACKAGES[*]} already installed"
    exit 0
fi
((${#missing[@]} > 0)) || missing=("${PACKAGES[@]}") # programs gone: reinstall

SUDO=()
if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null || {
        echo "install-slurm: needs root (or sudo) to install ${missing[*]}" >&2
        exit 1
    }
    SUDO=(sudo)
fi

# No service may start during the installation: there is no slurm.conf, and often no init.
POLICY=/usr/sbin/policy-rc.d
if [[ ! -e $POLICY ]]; then
    printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$POLICY" >/dev/null
    "${SUDO[@]}" chmod 755 "$POLICY"
    trap '"${SUDO[@]}" rm -f "$POLICY"' EXIT
fi

echo "install-slurm: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"

if ! have_programs; then
    echo "install-slurm: installed, but some of ${PROGRAMS[*]} are still missing" >&2
    exit 1
fi
echo "install-slurm: $(/usr/sbin/slurmctld -V), $(/usr/sbin/munged -V 2>&1 | head -n 1)"
