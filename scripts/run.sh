#!/usr/bin/env bash
# The main job on the built-in CPU default: `bash scripts/run.sh [nanoseek demo options]`.
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh" ""
exec "$VENV/bin/nanoseek" demo "$@"
