#!/usr/bin/env bash
# CI for the optional CUDA backend, with no GPU: builds fastattn with the cuda and test extras in
# a fresh virtual environment, compiles the kernel to PTX for every dtype signature (and checks
# its float32 kernels have no float64 instruction), and runs the contract tests plus
# tests/test_cuda.py on backend="cuda" under Numba's CUDA simulator.
# Usage: .ci/cuda.sh [python]   (default: $PYTHON, else python3)
# BUILD_DIR=<folder>: build the extension there (an earlier build of the same flags is reused);
# by default in a temporary folder.
# USE_ENV=<venv>: add the cuda extra to this virtual environment (one with the test extra, as
# .ci/run's) instead of making a fresh one: CI saves a second install of everything else.
# Exits non-zero on any failure, when pytest collects nothing, or when no contract test passed
# on the simulated CUDA backend.
PYTHON=${1:-${PYTHON:-python3}}
source "$(dirname "$0")/lib.sh"

if [ -n "${USE_ENV:-}" ]; then
  step "the cuda extra added to $USE_ENV"
  # shellcheck disable=SC1091
  source "$USE_ENV/bin/activate"
else
  step "fresh environment with the cuda and test extras"
  fresh_env "$work/env"
fi
# Its own build folder unless given one, so as not to collide with a developer's build/.
python -m pip install -q -Cbuild-dir="${BUILD_DIR:-$work/build}" ".[cuda,test]"
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
# The tests marked "cuda" (pyproject.toml; conftest.py marks every test the backend fixture
# runs on a CUDA entry); the PTX test of test_cuda.py (marked "ptx") repeats the step above.
# The simulator keeps one core busy per pytest worker.
# The simulator runs the kernel as Python, one thread at a time: the property tests draw the
# "simulator" profile's examples (tests/conftest.py), fewer than on the compiled paths.
HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-simulator} FASTATTN_TEST_CUDA=sim \
  run_pytest -q -rs -n auto -m "cuda and not ptx" \
  --junitxml="$work/junit.xml"
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
