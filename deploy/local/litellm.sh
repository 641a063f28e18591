#!/usr/bin/env bash
# The LiteLLM proxy's own virtualenv, for `llmstream bench litellm` (the side by side with a
# proxy users would pick instead of llmstream). LiteLLM pins many libraries (openai, pydantic,
# fastapi, uvicorn, ...) at versions of its own: they must not touch the main .venv, so the
# proxy gets a virtualenv of its own and the benchmark runs it as a separate process
# (`.venv-litellm/bin/litellm --config ...`). Re-running it over an existing virtualenv is safe.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV="${LITELLM_VENV:-.venv-litellm}"
PY="$VENV/bin/python"
LITELLM_VERSION=1.108.7   # llmstream_tools/bench/litellm.py is tested against this proxy (newer ones pin
                          # litellm-proxy packages PyPI does not serve yet)

say() { echo "make litellm: $*" >&2; }
fail() { echo "make litellm: $*" >&2; exit 1; }

command -v python3 >/dev/null || fail "python3 not found: install Python 3.11+"
test -x "$PY" || python3 -m venv "$VENV"
pip_install() { "$PY" -m pip install -q "$@" || fail "pip install $* failed: PyPI must be reachable"; }

pip_install --upgrade pip
say "litellm[proxy] $LITELLM_VERSION"
pip_install "litellm[proxy]==$LITELLM_VERSION"

# Fail here, not in the benchmark: the proxy's entry point and its server import.
export LITELLM_LOCAL_MODEL_COST_MAP=True  # the checks below: no fetch of the cost map (no internet)
"$VENV/bin/litellm" --help >/dev/null || fail "the litellm proxy does not start (see above)"
"$PY" - <<'PYEOF' || fail "the LiteLLM virtualenv does not import (see above)"
import importlib.metadata

import litellm.proxy.proxy_server  # noqa: F401

print(f"make litellm: litellm {importlib.metadata.version('litellm')} ready in {__import__('sys').prefix}")
PYEOF
touch "$VENV/.installed"
