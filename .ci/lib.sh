# The preamble every script of .ci/ sources: strict mode, the repository root as the working
# folder, a scratch folder removed on exit, and the helpers below. Not run on its own.
#   step TEXT          prints "=== TEXT (elapsed s)"
#   fresh_env DIR      makes a virtual environment in DIR (pip upgraded) and activates it
#   run_pytest ARGS    runs pytest; its status, except that "collected nothing" (5) fails as 1
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
start=$SECONDS
PYTHON=${PYTHON:-python3}
export PYTHON

step() { printf '\n=== %s (%d s)\n' "$*" "$((SECONDS - start))"; }

fresh_env() {
  "$PYTHON" -m venv "$1"
  # shellcheck disable=SC1091
  source "$1/bin/activate"
  python -m pip install -q --upgrade pip
}

run_pytest() {
  local status=0
  python -m pytest -p no:cacheprovider "$@" || status=$?
  if [ "$status" -eq 5 ]; then
    echo "pytest collected no test: failing" >&2
    return 1
  fi
  return "$status"
}
