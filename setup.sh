#!/bin/bash
# Installs everything moe-launcher needs on a fresh Debian machine, idempotently:
#   bash setup.sh          the launcher and the trainer (CPU torch where there is no GPU)
#   bash setup.sh --test   also what the tests use: shellcheck and Slurm (Debian packages)
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
want_test=0
[ "${1:-}" = "--test" ] && want_test=1

apt_install() {
    local missing=()
    for pkg in "$@"; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" != 0 ]; then
        echo "setup.sh: install these Debian packages first (needs root): ${missing[*]}" >&2
        return 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# torch first: 2.13.0 is the CPU wheel on these machines; any other version pulls CUDA builds.
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    "$PYTHON" -m pip install -q "torch==2.13.0"
fi
extras="train"
[ "$want_test" = 1 ] && extras="train,test"
"$PYTHON" -m pip install -q -e ".[$extras]"

if [ "$want_test" = 1 ]; then
    apt_install shellcheck slurmctld slurmd slurm-client munge
fi
echo "setup.sh: ready ($("$PYTHON" -c 'import torch, megatron.core; print("torch", torch.__version__, "megatron-core", megatron.core.__version__)'))"
