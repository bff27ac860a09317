#!/usr/bin/env bash
# Set up a virtual environment with the test extras (PyTorch CPU + transformers as references)
# and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
. "$VENV/bin/activate"
pip install --quiet --disable-pip-version-check -e ".[test]"
python -m pytest -q "$@"
