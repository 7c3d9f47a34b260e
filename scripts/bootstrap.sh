# Sourced by scripts/up and scripts/test: make .venv with the project installed.
# Idempotent: reinstalls only when pyproject.toml (or the extras asked for) changed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PYTHON="${PYTHON:-python3}"
EXTRAS="${1:-}"

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "Builder Engine needs Python 3.11 or newer; set PYTHON=/path/to/python3.11+" >&2
    exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.stamp-$(cat "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)-${EXTRAS:-base}"
if [ ! -f "$stamp" ]; then
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -e "$ROOT${EXTRAS:+[$EXTRAS]}"
    "$VENV/bin/python" -c "import workers.cli" # fail here, not later, when the install broke
    touch "$stamp"
fi
export PATH="$VENV/bin:$PATH"
