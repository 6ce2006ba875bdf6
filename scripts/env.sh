# Sourced by scripts/test.sh and scripts/quickstart.sh: create .venv (or $REGIONSPOT_VENV) on first
# use and install regionspot into it, so a fresh clone with only Python 3.11+ needs nothing else.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
  echo "error: regionspot needs Python 3.11 or newer; set PYTHON=/path/to/python3.11" >&2; exit 1; }
VENV=${REGIONSPOT_VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[test]"
export PATH="$PWD/$VENV/bin:$PATH"
