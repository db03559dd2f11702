#!/usr/bin/env bash
# CI: the AMX variant where no AMX CPU is at hand. Builds fastattn with FASTATTN_AMX_EMULATE
# (csrc/amx_tiles.hpp: the tile instructions as plain C++, the variant offered on any CPU with
# AVX512-BF16) into a fresh virtual environment and runs every test on the "amx" path: the
# contract suite through the backend fixture, and the AMX layout tests. On a CPU with AMX the
# real instructions run in the README's test command instead, and this script only repeats them.
#
#   .ci/amx_emulated.sh              # about 2 minutes on 2 cores, most of it building
source "$(dirname "$0")/lib.sh"
if ! grep -qw avx512_bf16 /proc/cpuinfo; then
  echo "amx_emulated.sh: this CPU has no AVX512-BF16, which the emulated variant builds on: skipped"
  exit 0
fi
fresh_env "$work/env"
python -m pip install -q ".[test]" -Cbuild-dir="$work/build" -Ccmake.define.FASTATTN_AMX_EMULATE=ON
(cd "$work" && python -c 'import fastattn, sys; print("amx:", fastattn._core.amx_status())
sys.exit(0 if "amx" in fastattn.available_isas() else 1)')
run_pytest -q -n auto -k amx  # the backend fixture's amx entries
