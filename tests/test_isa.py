"""Kernel variants: every instruction-set path is selectable, and FASTATTN_ISA forces one."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fastattn

pytestmark = pytest.mark.native  # the sanitizer build runs these (.ci/sanitize.sh)

KNOWN = ("amx", "avx512bf16", "avx512", "avx2", "baseline")
AVAILABLE = fastattn.available_isas()
# The automatic choice never takes "amx" (it has not yet run on an AMX CPU; see
# csrc/cpu_features.hpp): the best of the others.
AUTOMATIC = [isa for isa in AVAILABLE if isa != "amx"][0]


def test_available_isas():
    assert AVAILABLE and AVAILABLE[-1] == "baseline"
    assert set(AVAILABLE) <= set(KNOWN)
    assert AVAILABLE == [isa for isa in KNOWN if isa in AVAILABLE]  # best first


@pytest.mark.parametrize("isa", AVAILABLE)
def test_set_isa_switches_the_path(isa):
    try:
        fastattn.set_isa(isa)
        assert fastattn.active_isa() == isa
        q = np.ones((2, 5, 8), np.float32)
        assert fastattn.attention(q, q, q).shape == (2, 5, 8)
        assert fastattn.active_isa() == isa
    finally:
        fastattn.set_isa("")
    assert fastattn.active_isa() in AVAILABLE


@pytest.mark.parametrize("name", ["bogus", "AVX2", "sse", "avx512 "])
def test_unavailable_name_raises(name):
    before = fastattn.active_isa()
    with pytest.raises(ValueError) as info:
        fastattn.set_isa(name)
    for isa in AVAILABLE:
        assert isa in str(info.value), str(info.value)
    assert fastattn.active_isa() == before


def _run(script, **env):
    full = {k: v for k, v in os.environ.items() if k != "FASTATTN_ISA"}
    full.update(env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=full,
                          capture_output=True, text=True, timeout=120)


CHECK = """
    import numpy as np, fastattn
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 3, 20, 16), dtype=np.float32) for _ in range(3))
    err = np.abs(fastattn.attention(q, k, v) - fastattn.reference.attention(q, k, v)).max()
    assert err < 1e-5, err
    print(fastattn.active_isa())
"""


@pytest.mark.parametrize("isa", AVAILABLE)
def test_environment_variable_forces_a_path(isa):
    res = _run(CHECK, FASTATTN_ISA=isa)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == [isa]


def test_no_environment_variable_picks_the_best():
    res = _run(CHECK)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == [AUTOMATIC]


def test_amx_status_says_why():
    status = fastattn._core.amx_status()
    assert status.startswith("available: " if "amx" in AVAILABLE else "unavailable: "), status
    assert len(status.split(": ", 1)[1]) > 5


def test_set_isa_empty_goes_back_to_the_environment():
    forced = AVAILABLE[-1]
    other = AUTOMATIC
    res = _run(f"""
        import fastattn
        fastattn.set_isa({other!r}); a = fastattn.active_isa()
        fastattn.set_isa(""); b = fastattn.active_isa()
        print(a, b)
    """, FASTATTN_ISA=forced)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == [other, forced]


def test_bad_environment_variable_raises():
    res = _run("""
        import numpy as np, fastattn
        q = np.ones((2, 3), np.float32)
        for call in (lambda: fastattn.attention(q, q, q), fastattn.active_isa):
            try:
                call()
            except ValueError as e:
                print("ValueError:", e)
            else:
                print("no error")
    """, FASTATTN_ISA="bogus")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 2
    for line in lines:
        assert line.startswith("ValueError:") and "bogus" in line, line
        assert all(isa in line for isa in AVAILABLE), line
