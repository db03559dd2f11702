"""``import fastattn`` stays light: its submodules with heavy optional dependencies (dask, torch,
transformers) load on first attribute access, as NumPy's and SciPy's do."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

HEAVY = ("dask", "torch", "transformers")


def _run(code: str) -> None:
    subprocess.run([sys.executable, "-c", code], check=True)


def test_import_fastattn_imports_no_heavy_dependency():
    _run("import sys, fastattn; heavy = {'dask', 'torch', 'transformers', 'numba'} & "
         "{m.split('.')[0] for m in sys.modules}; assert not heavy, heavy")


@pytest.mark.parametrize("name", HEAVY)
def test_submodule_loads_on_first_access(name):
    needs = ("torch", "transformers") if name == "transformers" else (name,)
    missing = [m for m in needs if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"fastattn.{name} needs {', '.join(missing)}, not installed")
    _run(f"import sys, fastattn; assert 'fastattn.{name}' not in sys.modules; "
         f"mod = fastattn.{name}; assert sys.modules['fastattn.{name}'] is mod; "
         f"assert '{name}' in dir(fastattn)")


def test_unknown_attribute_is_an_attribute_error():
    import fastattn

    with pytest.raises(AttributeError, match="no_such_thing"):
        fastattn.no_such_thing  # noqa: B018
