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


# Makes the optional packages missing for the child process, as in an environment without
# fastattn's extras: importing them fails as it does for a package that is not installed.
_WITHOUT_EXTRAS = """
import sys
class Missing:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'dask', 'torch', 'transformers'}:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Missing())
"""


def test_help_works_without_the_optional_dependencies():
    # pydoc looks up every name dir() lists; the lazy submodules are listed only where they can
    # be imported, and one asked for by name says what it needs.
    _run(_WITHOUT_EXTRAS + """
import pydoc, fastattn
text = pydoc.render_doc(fastattn, renderer=pydoc.plaintext)
assert "attention_with_kvcache" in text and "Scaled dot-product attention" in text, text[:500]
assert not {'dask', 'torch', 'transformers'} & set(dir(fastattn))
try:
    fastattn.torch
except ImportError as e:
    assert "fastattn.torch needs torch" in str(e), e
else:
    raise AssertionError("fastattn.torch imported without torch")
""")
