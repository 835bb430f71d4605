#!/usr/bin/env bash
# Install Diffulex and its dev tools into the current Python. torch is installed first, pinned, and only
# when it is missing: an unpinned torch would pull gigabytes of CUDA packages on a CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -m pip install --quiet -e ".[dev]"
