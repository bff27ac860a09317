#!/usr/bin/env bash
# Set up a virtual environment with the test extras (PyTorch CPU + transformers as references)
# and run the test suite. Extra arguments go to pytest (TEST_WORKERS=0 runs it in one process).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
. "$VENV/bin/activate"
pip install --quiet --disable-pip-version-check -e ".[test]"
# Two workers, each taking whole test files (module fixtures are built once): many tests wait on
# subprocesses, servers and compiles, so two overlap well even on two cores.
python -m pytest -q -n "${TEST_WORKERS:-2}" --dist loadfile "$@"
