#!/usr/bin/env bash
# The GPU suite in one command (see benchmarks/gpu/README.md):
#
#   bash benchmarks/gpu/run.sh                  # on a CUDA machine: at most 8 minutes
#   bash benchmarks/gpu/run.sh --dry-run        # every stage at toy sizes on the CPU
#   bash benchmarks/gpu/run.sh --out DIR        # results elsewhere than benchmarks/results
#   GIT_COMMIT=<sha> bash benchmarks/gpu/run.sh # name the commit where the tree has no .git
#
# Installs nothing: it runs our three packages from their src/ folders with whatever
# python3 (or $PYTHON) provides torch. All arguments go to benchmarks/gpu/suite.py.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
python="${PYTHON:-$(command -v python3 || command -v python || true)}"
if [[ -z "$python" ]]; then
    echo "run.sh: no python3 on PATH; set PYTHON=/path/to/python" >&2
    exit 2
fi
export PYTHONPATH="$root/packages/invertible-core/src:$root/packages/invertible-models/src:$root/packages/invertible-train/src:$here${PYTHONPATH:+:$PYTHONPATH}"
cd "$root"
exec "$python" "$here/suite.py" "$@"
