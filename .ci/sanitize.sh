#!/usr/bin/env bash
# CI: build fastattn with AddressSanitizer and UndefinedBehaviorSanitizer (the CMake option
# FASTATTN_SANITIZE) into a fresh virtual environment and run the contract tests under them,
# then, from the same build, the C++ core alone (csrc/tests/driver.cpp) under ASan, LeakSanitizer
# and UBSan. Without an AMX CPU the amx variant is built emulated (csrc/amx_tiles.hpp), so every
# test below also runs on the "amx" path: what .ci/amx_emulated.sh checks, under the sanitizers.
# Fails on a test failure and on any sanitizer report, in pytest or in a subprocess it starts.
#
#   .ci/sanitize.sh                  # the CI run: about 5 minutes on 2 cores, half of it building
#   .ci/sanitize.sh -k gqa           # extra arguments go to pytest
#   ROUNDS=2000 .ci/sanitize.sh      # more random problems for the driver (default 400)
source "$(dirname "$0")/lib.sh"

fresh_env "$work/env"
# The build directory is a temporary one: never build/ of the checkout, whose objects are not
# instrumented and would be reused.
# Without an AMX CPU the amx variant is built emulated (csrc/amx_tiles.hpp), so that its layouts
# run under the sanitizers too; with one, its real instructions do.
amx=ON
grep -qw amx_bf16 /proc/cpuinfo && amx=OFF
# Where the CPU runs avx512bf16, that variant compiles the avx512 variant's float paths from the
# same source with the same intrinsics: avx512 is not built again; nor is avx2, whose kernels
# .ci/leaks.sh runs under valgrind's memcheck (which has no AVX-512) in the C++ driver, the
# forward and backward of every storage included. Each variant left out is a fifth of the build
# and of the tests (every test runs once per variant). baseline is every build's fallback.
skip=""
grep -qw avx512_bf16 /proc/cpuinfo && skip="avx512;avx2"
python -m pip install -q ".[test]" -Cbuild-dir="$work/build" -Ccmake.define.FASTATTN_SANITIZE=ON \
  -Ccmake.define.FASTATTN_AMX_EMULATE=$amx -Ccmake.define.FASTATTN_BUILD_TESTS=ON \
  -Ccmake.define.FASTATTN_SKIP_ISAS="$skip"
echo "sanitized build and install: $((SECONDS - start)) s"

# (Located without importing fastattn: that would load the extension without the runtime.)
pkg=$(python -c 'import importlib.util as u
print(u.find_spec("fastattn").submodule_search_locations[0])')
core=$(echo "$pkg"/_core*.so)
# Python itself is not instrumented, so the ASan runtime must be loaded before anything else:
# preload the runtimes the extension was linked against (the compiler's own, found by ldd).
runtime() { ldd "$core" | awk -v lib="$1" '$1 ~ lib {print $3}'; }
asan=$(runtime libasan)
ubsan=$(runtime libubsan)
if [ -z "$asan" ] || [ -z "$ubsan" ]; then
  echo "the extension $core is not linked against libasan and libubsan" >&2
  exit 1
fi

mkdir -p "$work/reports"
export LD_PRELOAD="$asan $ubsan"
# detect_leaks=0: CPython never frees its interned strings, static types and module state at exit,
# so LeakSanitizer would report thousands of the interpreter's allocations, none of fastattn's.
# The core's own leaks are checked by the driver below (and .ci/leaks.sh), growth under Python by
# tests/test_leaks.py. ASan reports go to files, so that one in a subprocess (tests/test_isa.py
# runs some) is not lost with that process's stderr; UBSan ignores log_path when it shares the
# process with ASan and writes to stderr, which pytest therefore must not capture (below).
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:check_initialization_order=1"
ASAN_OPTIONS+=":strict_init_order=1:log_path=$work/reports/asan"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:abort_on_error=1"
# Python objects through malloc too, so that ASan watches them as it watches the arrays' data.
export PYTHONMALLOC=malloc
# Fewer Hypothesis examples than the "ci" profile: the sanitizers slow the kernel down ~3x and
# every test runs once per instruction set. (The "sanitize" profile is in tests/conftest.py.)
export HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-sanitize}
export FASTATTN_FUZZ_EXAMPLES=${FASTATTN_FUZZ_EXAMPLES:-60}

# The tests marked "native" (pyproject.toml): every test file that runs the kernel, each test on
# every dispatch path (the backend fixture runs each instruction set this CPU has): 16-bit
# storage, variants, merges, layers and the backward pass included.
# Not marked: the memory-bound test (marked slow: 1 GiB inputs), the resident-memory test
# (tests/test_leaks.py: ASan keeps freed memory in quarantine, ~250 MB, on purpose), Dask (a
# cluster of worker processes), the examples and plots (no kernel path the others miss).
status=0
# --capture=sys: pytest captures what Python writes, not file descriptor 2, so a sanitizer's
# report reaches the log even when it kills the process mid-test (a pytest-xdist worker's
# file descriptor 2 is this script's).
run_pytest -q --capture=sys -n auto -m "native and not slow" "$@" \
  2>&1 | tee "$work/pytest.log" || status=$?  # pipefail: pytest's status
deactivate
if grep -q "runtime error:\|ERROR: AddressSanitizer\|ERROR: LeakSanitizer" "$work/pytest.log"; then
  echo "a sanitizer reported an error (above)" >&2
  status=1
fi

# The C++ core alone, from the same sanitized objects: every kernel (AVX-512 and the emulated
# AMX included, which valgrind's CPU cannot run), with LeakSanitizer on (no interpreter here).
echo "=== the C++ driver under ASan, LeakSanitizer and UBSan"
env -u LD_PRELOAD ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:check_initialization_order=1 \
  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  "$work/build/fastattn_driver" "${ROUNDS:-400}" || status=1

reports=$(find "$work/reports" -type f | sort)
if [ -n "$reports" ]; then
  echo "sanitizer reports:" >&2
  for r in $reports; do
    echo "--- $r" >&2
    cat "$r" >&2
  done
  status=1
fi
echo "sanitize.sh: exit $status after $((SECONDS - start)) s"
exit "$status"
