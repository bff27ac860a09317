"""enwik8: bits per byte on the test split (the last 5 of its 100 million bytes).

The bytes are decoded as UTF-8 (a character cut at the split's edge becomes U+FFFD), tokenized,
and scored with sliding windows (stride n_ctx / 2 by default); bits_per_byte divides the total
loss in bits by the split's own byte count. GPT-2 124M: 1.16 in the GPT-2 paper.
"""

from __future__ import annotations

import math
import zipfile

import numpy as np

from .base import Prepared, register_task
from .data import DataFile
from .scorer import rolling_requests

FILE = DataFile(("enwik8.zip", "enwik8"), url="http://mattmahoney.net/dc/enwik8.zip",
                fixture_sha256=("f0daecff2fa78d4d75becaa87b98b61dcf9eaa78d5e25c52149ce05693340174",))


def read_bytes(path: str) -> bytes:
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            return z.read("enwik8")
    with open(path, "rb") as f:
        return f.read()


def test_split(data: bytes) -> bytes:
    """The last twentieth: bytes 95M to 100M of the real file, the split every paper uses."""
    return data[len(data) * 19 // 20:]


@register_task("enwik8", files=(FILE,), headline="bits_per_byte",
               doc="enwik8 test split (last 5M bytes): bits per byte (sliding windows)")
def prepare(paths, tokenizer, n_ctx, limit=0, stride=None) -> Prepared:
    data = test_split(read_bytes(paths[0]))
    if limit:  # the first `limit` lines
        data = b"".join(data.splitlines(keepends=True)[:limit])
    tokens = np.asarray([tokenizer.eot_id] + tokenizer.encode(data.decode("utf-8", errors="replace")), np.int32)
    requests = rolling_requests(tokens, n_ctx, stride or max(1, n_ctx // 2))

    def finish(ll: np.ndarray, greedy: np.ndarray) -> dict:
        nll = -float(np.sum(ll))
        return {"bits_per_byte": nll / math.log(2) / len(data), "token_perplexity": math.exp(nll / (len(tokens) - 1))}

    return Prepared(requests, finish, len(data))
