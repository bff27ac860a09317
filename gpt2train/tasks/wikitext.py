"""WikiText-2 and WikiText-103 (raw, test set): word-level perplexity and bits per byte.

The test set is one text (the two datasets share it), detokenized before it is tokenized, as the
GPT-2 paper did (WikiText writes "1 @,@ 000" and "word , word"), then scored with sliding
windows: each scores `stride` new tokens (default n_ctx / 2) with up to n_ctx tokens of context.
word_perplexity = exp(total loss / words), the words being WikiText's own whitespace-separated
tokens, so it is comparable across vocabularies; bits_per_byte counts the detokenized text's
UTF-8 bytes. The paper's 124M figure is 29.41 on WikiText-2 (37.50 on WikiText-103).
"""

from __future__ import annotations

import math
import re

import numpy as np

from .base import Prepared, register_task
from .data import DataFile
from .scorer import rolling_requests

PARQUET = "test-00000-of-00001.parquet"
# The two datasets share one test set, and so one fixture: its Parquet file and its raw text.
FIXTURE_SHA256 = ("a81958c8a0d1e6b285433b411db7252ffdc5e848d2e646f3432cb3d07df45777",
                  "71884d1fe25a4708db6cddaad7f3da9483020d019c0087cf512f7528ece4ca58")


def wikitext_file(config: str) -> DataFile:
    return DataFile((f"{config}/{PARQUET}", "wiki.test.raw"), hub=("Salesforce/wikitext", f"{config}/{PARQUET}"),
                    fixture_sha256=FIXTURE_SHA256)


def read_raw(path: str) -> str:
    """The raw test text from the hub's Parquet file (one row per line) or a wiki.test.raw file."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq
        return "".join(pq.read_table(path, columns=["text"]).column("text").to_pylist())
    with open(path, encoding="utf-8") as f:
        return f.read()


_SPACED = [(" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" : ", ": "), (" ; ", "; "), (" . ", ". "),
           (" , ", ", "), (" ! ", "! "), (" ? ", "? "), (" 's ", "'s "), ("( ", "("), (" )", ")"),
           (" .\n", ".\n"), (" ,\n", ",\n")]


def detokenize(text: str) -> str:
    """Undo WikiText's tokenization: joined numbers and hyphens, punctuation against its word,
    headings as MediaWiki writes them (= = Heading = = -> == Heading ==)."""
    for old, new in _SPACED:
        text = text.replace(old, new)
    text = re.sub(r"= = = (.*?) = = =", r"=== \1 ===", text)
    return re.sub(r"= = (.*?) = =", r"== \1 ==", text)


def articles(raw: str) -> list[str]:
    """The text cut before each top-level heading (" = Title = " on its own line)."""
    starts = [m.start() for m in re.finditer(r"^ = [^=].*[^=] = \n", raw, flags=re.M)] or [0]
    starts[0] = 0
    return [raw[a:b] for a, b in zip(starts, starts[1:] + [len(raw)])]


def prepare_wikitext(paths, tokenizer, n_ctx, limit=0, stride=None) -> Prepared:
    parts = articles(read_raw(paths[0]))
    raw = "".join(parts[:limit] if limit else parts)
    text = detokenize(raw)
    tokens = np.asarray([tokenizer.eot_id] + tokenizer.encode(text), np.int32)
    requests = rolling_requests(tokens, n_ctx, stride or max(1, n_ctx // 2))
    words, n_bytes = len(raw.split()), len(text.encode("utf-8"))

    def finish(ll: np.ndarray, greedy: np.ndarray) -> dict:
        nll = -float(np.sum(ll))
        return {"word_perplexity": math.exp(nll / words), "token_perplexity": math.exp(nll / (len(tokens) - 1)),
                "bits_per_byte": nll / math.log(2) / n_bytes}

    return Prepared(requests, finish, len(parts[:limit] if limit else parts))


for _name, _config in (("wikitext2", "wikitext-2-raw-v1"), ("wikitext103", "wikitext-103-raw-v1")):
    register_task(_name, files=(wikitext_file(_config),), headline="word_perplexity",
                  doc=f"WikiText ({_config}) test set: word-level perplexity (sliding windows) and bits per byte")(
        prepare_wikitext)
