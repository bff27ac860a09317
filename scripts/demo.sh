#!/usr/bin/env bash
# Set up a virtual environment and run the built-in demo: train a tokenizer and a small GPT-2 on
# Python's own standard library for a few CPU minutes, report held-out perplexity, and sample.
# Extra arguments go to `python -m gpt2train demo` (e.g. --out DIR, --steps N).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
. "$VENV/bin/activate"
pip install --quiet --disable-pip-version-check -e ".[plot]"  # matplotlib: demo_run/model/curves.png
python -m gpt2train demo "$@"
