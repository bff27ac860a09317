#!/usr/bin/env python3
"""Seed-compatible entry point.

    python3 main.py --model configs/124M.json                       # train (resumes if possible)
    python3 main.py --model configs/124M.json --predict_text "Hi"   # generate
"""

import sys

from gpt2train.host_memory import reexec_with_resident_heap

if __name__ == "__main__":
    reexec_with_resident_heap()  # before JAX loads: see gpt2train/host_memory.py
    from gpt2train.cli import guarded, seed_main
    sys.exit(guarded(seed_main))
