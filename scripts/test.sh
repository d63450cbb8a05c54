#!/usr/bin/env bash
# The test suite: `bash scripts/test.sh [pytest options]`.
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh" dev
cd "$ROOT"
exec "$VENV/bin/python" -m pytest -q "$@"
