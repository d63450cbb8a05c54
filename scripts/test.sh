#!/usr/bin/env bash
# The test suite: `bash scripts/test.sh [pytest options]`.
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh" dev
cd "$ROOT"
# the chat page's browser test drives Debian's Chromium; install it where we may (it is skipped, saying why, elsewhere)
if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "setup: installing chromium for the browser test" >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
    || echo "setup: could not install chromium; the browser test will be skipped" >&2
fi
# the GGUF export's llama.cpp tests need llama-cpp-python, which PyPI ships as source: built once (minutes)
if ! "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
  echo "setup: building llama-cpp-python for the GGUF tests (a few minutes, once)" >&2
  CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "llama-cpp-python==0.3.36" \
    || echo "setup: could not build llama-cpp-python; the llama.cpp tests will be skipped" >&2
fi
exec "$VENV/bin/python" -m pytest -q "$@"
