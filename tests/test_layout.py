"""The package's layout rules, read from the source with ``ast`` (nothing is imported):

* no function longer than ``MAX_LINES`` lines, from its ``def`` to the end of its body, its
  docstring not counted (documentation, however long, is not logic); no C++ function of the
  core (``csrc/``, its test driver aside) longer than ``MAX_KERNEL_LINES``, from its signature
  to its closing brace;
* no private name (``_x``, not a dunder and not a module of the package) imported from another
  module;
* ``backends/`` imports neither ``nn/`` nor ``bench/`` nor the integrations built on top of the
  core (``dask``, ``torch``, ``transformers``), and ``nn/`` does not import ``bench/``;
* no circle among the package's modules, counting the imports made inside functions too.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "fastattn"
CSRC = SRC.parent.parent / "csrc"
MAX_LINES = 80
MAX_KERNEL_LINES = 70

pytestmark = pytest.mark.skipif(not SRC.is_dir(), reason="needs the source tree (src/fastattn)")


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every Python module of the package."""
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = ("fastattn",) + path.relative_to(SRC).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()
# Compiled modules (their stubs): importable names that are modules, though not .py files.
COMPILED = {"fastattn." + p.stem for p in SRC.rglob("*.pyi")}


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _imports(name: str) -> list[tuple[str, str | None, int]]:
    """(module imported from, name imported or None, line) of every import in a module, those
    inside functions included; relative imports resolved."""
    tree = ast.parse(MODULES[name].read_text())
    package = name if _is_package(name) else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found += [(base, alias.name, node.lineno) for alias in node.names]
    return found


def _targets(name: str) -> set[str]:
    """The package's modules a module imports (a name that is a submodule counts as it)."""
    out = set()
    for base, imported, _ in _imports(name):
        sub = f"{base}.{imported}" if imported else None
        if sub in MODULES:
            out.add(sub)
        elif sub in COMPILED:  # a compiled module imports none of the package's
            continue
        elif base in MODULES:
            out.add(base)
    out.discard(name)
    return out


def _docstring_lines(node) -> int:
    first = node.body[0]
    is_doc = (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
              and isinstance(first.value.value, str))
    return first.end_lineno - first.lineno + 1 if is_doc else 0


def test_no_function_is_too_long():
    long = []
    for path in MODULES.values():
        rel = path.relative_to(SRC).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1 - _docstring_lines(node)
                if lines > MAX_LINES:
                    long.append(f"{rel}:{node.lineno} {node.name}: {lines} lines")
    assert not long, f"functions over {MAX_LINES} lines:\n" + "\n".join(long)


def _cpp_code(text: str) -> str:
    """C++ source with comments, string and character literals and preprocessor lines blanked
    (newlines kept, so positions keep their line numbers)."""
    def blank(m):
        return re.sub(r"[^\n]", " ", m.group(0))

    code = re.sub(r"//[^\n]*|/\*.*?\*/|\"(?:\\.|[^\"\\])*\"|'(?:\\.|[^'\\])*'", blank, text,
                  flags=re.S)
    return re.sub(r"^\s*#[^\n]*", blank, code, flags=re.M)


# What precedes a function body's brace: a parameter list and its qualifiers, or a constructor's
# initializer list; what precedes other braces: a type or namespace, a control statement, an
# initializer.
_CPP_SIGNATURE = re.compile(r"\)\s*(?:const\s*|noexcept\s*|override\s*|final\s*)*(?:->[^;{}]*)?$")
_CPP_CTOR_INIT = re.compile(r"\)\s*:\s*[\w:<>]+\s*\(.*\)\s*$", re.S)
_CPP_SCOPE = re.compile(r"^(?:template\s*<.*>\s*)?(?:struct|class|union|enum|namespace|extern)\b",
                        re.S)
_CPP_CONTROL = re.compile(r"\b(?:if|for|while|switch|catch|do|else)\s*(?:\(.*\))?\s*$", re.S)


def _cpp_functions(text: str) -> list[tuple[str, int, int]]:
    """(name, first line, lines) of every function defined in a C++ source, by its braces (a
    lambda or local type inside a function counts as the function's)."""
    code = _cpp_code(text)
    stack, seg, found = [], 0, []
    for i, c in enumerate(code):
        if c == "{":
            head = code[seg:i].strip()
            is_fn = (not any(kind == "fn" for kind, _, _ in stack) and bool(head)
                     and not _CPP_SCOPE.match(head) and not _CPP_CONTROL.search(head)
                     and not head.endswith(("=", ",", "(", "]"))
                     and bool(_CPP_SIGNATURE.search(head) or _CPP_CTOR_INIT.search(head)))
            start = code.count("\n", 0, i - len(code[seg:i].lstrip())) + 1
            names = re.findall(r"([~\w]+)\s*\(", head.split(")")[0] + ")")
            stack.append(("fn" if is_fn else "other", start, names[-1] if names else head))
            seg = i + 1
        elif c == "}":
            kind, start, name = stack.pop()
            if kind == "fn":
                found.append((name, start, code.count("\n", 0, i) + 2 - start))
            seg = i + 1
        elif c == ";":
            seg = i + 1
    return found


@pytest.mark.skipif(not CSRC.is_dir(), reason="needs the source tree (csrc)")
def test_no_kernel_function_is_too_long():
    sources = sorted(CSRC.glob("*.hpp")) + sorted(CSRC.glob("*.cpp"))
    found = {p.name: _cpp_functions(p.read_text()) for p in sources}
    assert sum(map(len, found.values())) > 100, "the reader found almost no function"
    long = [f"csrc/{name}:{start} {fn}: {lines} lines" for name, fns in found.items()
            for fn, start, lines in fns if lines > MAX_KERNEL_LINES]
    assert not long, f"C++ functions over {MAX_KERNEL_LINES} lines:\n" + "\n".join(long)


def test_no_private_name_is_imported_across_modules():
    found = []
    for name in MODULES:
        for base, imported, line in _imports(name):
            if not base.startswith("fastattn") or imported is None:
                continue
            private = imported.startswith("_") and not imported.startswith("__")
            module = f"{base}.{imported}"
            if private and module not in MODULES and module not in COMPILED:
                found.append(f"{name}:{line} imports {imported} from {base}")
    assert not found, "\n".join(found)


@pytest.mark.parametrize("importer,forbidden", [
    ("fastattn.backends", ("fastattn.nn", "fastattn.bench", "fastattn.dask", "fastattn.torch",
                           "fastattn.transformers", "fastattn.__main__")),
    ("fastattn.nn", ("fastattn.bench", "fastattn.backends", "fastattn.__main__")),
    ("fastattn._", ("fastattn.nn", "fastattn.bench", "fastattn.__main__")),  # core modules
])
def test_no_upward_import(importer, forbidden):
    found = []
    for name in MODULES:
        if not name.startswith(importer) or name == "fastattn.__main__":
            continue
        for target in _targets(name):
            if any(target == f or target.startswith(f + ".") for f in forbidden):
                found.append(f"{name} imports {target}")
    assert not found, "\n".join(found)


def test_no_import_circle():
    graph = {name: _targets(name) for name in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                circle = visit(nxt)
                if circle:
                    return circle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            circle = visit(start)
            assert circle is None, "import circle: " + " -> ".join(circle)


def test_the_layout():
    # What the README's "Layout" section describes.
    for name in ("fastattn.backends", "fastattn.backends.cpu", "fastattn.backends.cuda",
                 "fastattn.backends.cuda_kernel", "fastattn.backends.reference", "fastattn.nn",
                 "fastattn.bench", "fastattn.bench.peers", "fastattn.bench.cli"):
        assert name in MODULES, name
    # every module says what it is
    for name, path in MODULES.items():
        assert ast.get_docstring(ast.parse(path.read_text())), f"{name} has no docstring"
