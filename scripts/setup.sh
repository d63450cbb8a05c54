# Sourced by run.sh and test.sh: make ./.venv (or $NANOSEEK_VENV) and install nanoseek with the given extras.
# torch is installed only when the environment lacks it (torch==2.13.0; bring your own build for CUDA/other OSes).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${NANOSEEK_VENV:-$ROOT/.venv}
EXTRAS=${1:-}
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV" >&2
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "setup: installing torch==2.13.0 (install your own torch into $VENV to skip this)" >&2
  "$PY" -m pip install -q --disable-pip-version-check "torch==2.13.0"
fi
STAMP="$VENV/.nanoseek-$(cat "$ROOT/pyproject.toml" | cksum | cut -d' ' -f1)-${EXTRAS:-core}"
if [ ! -f "$STAMP" ]; then
  echo "setup: installing nanoseek${EXTRAS:+[$EXTRAS]} into $VENV" >&2
  "$PY" -m pip install -q --disable-pip-version-check -e "$ROOT${EXTRAS:+[$EXTRAS]}"
  touch "$STAMP"
fi
