#!/usr/bin/env python3
"""Seed-compatible entry point.

    python3 main.py --model configs/124M.json                       # train (resumes if possible)
    python3 main.py --model configs/124M.json --predict_text "Hi"   # generate
"""

import sys

from gpt2train.cli import guarded, seed_main

if __name__ == "__main__":
    sys.exit(guarded(seed_main))
