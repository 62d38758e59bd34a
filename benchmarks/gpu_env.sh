# Sourced by the gpu_*.sh scripts: strict mode, the repository root as working folder, this
# checkout's package on PYTHONPATH (nothing is installed on the lent GPU machine), and
# DATA and OUT with their defaults (OUT created).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
DATA=${DATA:-data}
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
