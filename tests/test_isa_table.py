"""csrc/isa_table.def, the one list of kernel variants, agrees with what the build offers."""

from __future__ import annotations

import pathlib
import re

import pytest

import fastattn

TABLE = pathlib.Path(__file__).resolve().parent.parent / "csrc" / "isa_table.def"
# The row syntax CMakeLists.txt reads (its _fastattn_isa_row_regex), Python's spelling.
ROW = re.compile(r'^FASTATTN_ISA\(([a-z0-9_]+), *([A-Za-z0-9]+), *([0-9]+), *([a-z0-9_]+), '
                 r'*"([^"]*)", *(.+)\)$')

if not TABLE.exists():  # tests run from an installed wheel without the sources
    pytest.skip("csrc/isa_table.def is not here", allow_module_level=True)


def rows():
    lines = [line for line in TABLE.read_text().splitlines() if line.startswith("FASTATTN_ISA(")]
    return [ROW.match(line) for line in lines]


def test_every_row_reads_as_cmake_reads_it():
    parsed = rows()
    assert parsed and all(parsed), [r for r in parsed if not r]
    names = [r.group(1) for r in parsed]
    assert len(set(names)) == len(names)
    assert names[-1] == "baseline"  # the fallback, last: every CPU runs it
    for r in parsed:
        assert r.group(3) in ("16", "32", "64"), r.group(0)
        assert r.group(4) in ("any", "x86_64"), r.group(0)
        assert ";" not in r.group(0) and "[" not in r.group(0)  # CMake list syntax


def test_available_isas_follow_the_table_order():
    names = [r.group(1) for r in rows()]
    available = fastattn.available_isas()
    assert set(available) <= set(names)
    assert available == [name for name in names if name in available]  # best first


@pytest.mark.parametrize("name", [r.group(1) for r in rows()])
def test_every_row_is_either_selectable_or_refused_by_name(name):
    try:
        if name in fastattn.available_isas():
            fastattn.set_isa(name)
            assert fastattn.active_isa() == name
        else:
            with pytest.raises(ValueError, match=f"isa='{name}' is not available"):
                fastattn.set_isa(name)
    finally:
        fastattn.set_isa("")
