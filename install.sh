#!/usr/bin/env bash
# Create (or reuse) a virtualenv and install ovlt for CPU: torch's CPU build first, pinned,
# so no dependency can pull a multi-GB CUDA build. GPU machines: use the Dockerfile instead.
#   VENV=path ./install.sh      (default: .venv in the repo)
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -U pip
"$VENV/bin/python" -m pip install -q --disable-pip-version-check torch==2.13.0
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[dev]"
echo "ovlt installed in $VENV"
