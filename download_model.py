#!/usr/bin/env python3
"""Fetch a pretrained GPT-2 (124M 355M 774M 1558M, or 117M/345M) or just its `encoder`, or
convert a local checkpoint directory; prints the ready config's path last.

    python3 download_model.py 124M [--out models]
"""

import sys

from gpt2train.cli import main

if __name__ == "__main__":
    main(["download", *sys.argv[1:]])
