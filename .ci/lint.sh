#!/usr/bin/env bash
# CI: ruff on the package, tests and benchmarks; mypy on the package (its configuration is
# [tool.mypy] in pyproject.toml; the compiled module is typed by src/fastattn/_core.pyi, so
# nothing needs building). Tools are pinned so that a new release cannot fail CI on its own.
source "$(dirname "$0")/lib.sh"
fresh_env "$work/env"
# numpy for its type annotations (mypy reads them); nothing else of fastattn's is installed.
"$work/env/bin/python" -m pip install -q "ruff==0.17.6" "mypy==2.4.1" numpy
status=0
echo "=== ruff check src/fastattn tests bench"
"$work/env/bin/ruff" check src/fastattn tests bench || status=1
echo "=== mypy (src/fastattn)"
"$work/env/bin/mypy" --cache-dir "$work/mypy-cache" || status=1
echo "lint.sh: exit $status after $((SECONDS - start)) s"
exit "$status"
