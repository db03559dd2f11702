#!/usr/bin/env bash
# CI: the C++ core on its own, with no Python, must compute right, leak nothing and touch no
# memory it does not own. Builds csrc/tests/driver.cpp (CMake option FASTATTN_BUILD_TESTS) in a
# temporary build directory and runs it
#   1. natively, checked against its naive loop;
#   2. under valgrind memcheck: any invalid access, uninitialised read or leak fails.
# Valgrind's virtual CPU has no AVX-512, so it sees the avx2 and baseline kernels: only those
# two variants are built here (FASTATTN_SKIP_ISAS). Every kernel, AVX-512 and amx included, runs
# in the driver under AddressSanitizer, LeakSanitizer and UBSan in .ci/sanitize.sh, which builds
# it with the sanitized extension.
#
#   .ci/leaks.sh              # about 1 minute on 2 cores, mostly compiling
#   ROUNDS=2000 .ci/leaks.sh   # more random problems per instruction set (default 400)
source "$(dirname "$0")/lib.sh"
rounds=${ROUNDS:-400}

if ! command -v cmake >/dev/null || ! command -v ninja >/dev/null; then
  "$PYTHON" -m venv "$work/tools"
  "$work/tools/bin/python" -m pip install -q cmake ninja
  export PATH="$work/tools/bin:$PATH"
fi
build() {  # build <dir> <cmake args...>
  local dir=$1
  shift
  cmake -S "$root" -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DFASTATTN_BUILD_TESTS=ON \
    "$@" >"$dir.log" 2>&1 || { cat "$dir.log"; return 1; }
  cmake --build "$dir" --target fastattn_driver >>"$dir.log" 2>&1 || { cat "$dir.log"; return 1; }
}

step "build the driver"
build "$work/plain" "-DFASTATTN_SKIP_ISAS=amx;avx512bf16;avx512"
step "driver, natively"
"$work/plain/fastattn_driver" "$rounds"

step "driver under valgrind memcheck"
if command -v valgrind >/dev/null; then
  # The thread pool keeps its worker threads to the end (csrc/thread_pool.hpp); glibc's
  # thread-local block of each (allocated by pthread_create) is then only reachable through the
  # thread itself, which memcheck calls "possibly lost". That is the one report suppressed here;
  # every other possible leak fails.
  cat >"$work/pool.supp" <<'EOF'
{
   pool-worker-thread-tls
   Memcheck:Leak
   match-leak-kinds: possible
   fun:calloc
   ...
   fun:_dl_allocate_tls
   ...
   fun:pthread_create*
   ...
   fun:_ZN8fastattn*4grow*
}
EOF
  valgrind -q --error-exitcode=3 --leak-check=full --show-leak-kinds=definite,indirect,possible \
    --errors-for-leak-kinds=definite,indirect,possible --track-origins=yes \
    --suppressions="$work/pool.supp" "$work/plain/fastattn_driver" "$rounds"
else
  echo "valgrind is not installed: this pass is NOT run (.ci/sanitize.sh runs LeakSanitizer)" >&2
fi

step "leaks.sh passed"
