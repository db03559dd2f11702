#!/usr/bin/env bash
# CI for the optional CUDA backend, with no GPU: builds fastattn with the cuda and test extras in
# a fresh virtual environment, compiles the kernel to PTX for every dtype signature (and checks
# its float32 kernels have no float64 instruction), and runs the contract tests plus
# tests/test_cuda.py on backend="cuda" under Numba's CUDA simulator.
# Usage: .ci/cuda.sh [python]   (default: $PYTHON, else python3)
# BUILD_DIR=<folder>: build the extension there (an earlier build of the same flags is reused);
# by default in a temporary folder.
# Exits non-zero on any failure, when pytest collects nothing, or when no contract test passed
# on the simulated CUDA backend.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-${PYTHON:-python3}}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

step() { printf '\n=== %s\n' "$*"; }

step "fresh environment with the cuda and test extras"
"$py" -m venv "$work/env"
# shellcheck disable=SC1091
source "$work/env/bin/activate"
python -m pip install -q --upgrade pip
# Its own build folder unless given one, so as not to collide with a developer's build/.
python -m pip install -q -Cbuild-dir="${BUILD_DIR:-$work/build}" ".[cuda,test]"
# CI's own tool, not a test extra: the simulator runs on one core, so two pytest workers halve
# the step on two cores.
python -m pip install -q "pytest-xdist>=3"
python - <<'PY'
import importlib.util, sys
missing = [m for m in ("numba_cuda", "pytest", "hypothesis") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"not installed by .[cuda,test]: {missing} (is the cuda extra in pyproject.toml?)")
PY

step "PTX for every signature (real compilation, no GPU)"
# Its own process, without the simulator; exit 3 (toolkit missing) fails here too.
env -u NUMBA_ENABLE_CUDASIM python tests/cuda_ptx_check.py

step "contract tests and test_cuda.py on backend='cuda', under the simulator"
status=0
# The PTX test of test_cuda.py repeats the step above: deselected here.
FASTATTN_TEST_CUDA=sim python -m pytest -q -p no:cacheprovider -rs -n "$(nproc)" \
  -k "cuda and not test_ptx_compiles" --junitxml="$work/junit.xml" tests || status=$?
if [ "$status" -eq 5 ]; then
  echo "pytest collected no test: failing" >&2
  exit 1
fi
[ "$status" -eq 0 ] || exit "$status"
python - "$work/junit.xml" <<'PY'
import sys
import xml.etree.ElementTree as ET

cases = ET.parse(sys.argv[1]).getroot().iter("testcase")
passed = [c for c in cases if "cuda-sim" in c.get("name", "") and not list(c)]
print(f"{len(passed)} contract tests passed on the simulated CUDA backend")
if not passed:
    sys.exit("no contract test ran on the simulated CUDA backend")
PY

step "CUDA CI passed"
