"""Per-document perplexity of the user's own text, as lm-evaluation-harness's loglikelihood_rolling
scores it: each document on its own, after <|endoftext|>, in disjoint windows of n_ctx targets
(each later window a full n_ctx tokens ending at its last target).

word_perplexity = exp(total loss / words), words being re.split(r"\\s+", document) pieces;
byte_perplexity = exp(total loss / UTF-8 bytes); bits_per_byte = total loss in bits / bytes.
"""

from __future__ import annotations

import math
import re

import numpy as np

from ..paths import expand_paths
from ..text_sources import iter_documents
from .base import Prepared, first
from .scorer import rolling_requests


def prepare_documents(spec, tokenizer, n_ctx, limit=0) -> Prepared:
    texts = first([text for _, text in iter_documents(expand_paths(spec))], limit)
    requests, words, n_bytes = [], 0, 0
    for text in texts:
        tokens = tokenizer.encode(text)
        if tokens:
            requests += rolling_requests(np.asarray([tokenizer.eot_id] + tokens, np.int32), n_ctx)
        words += len(re.split(r"\s+", text))
        n_bytes += len(text.encode("utf-8"))

    def finish(ll: np.ndarray, greedy: np.ndarray) -> dict:
        nll = -float(np.sum(ll))
        return {"word_perplexity": math.exp(nll / words), "byte_perplexity": math.exp(nll / n_bytes),
                "bits_per_byte": nll / math.log(2) / n_bytes}

    return Prepared(requests, finish, len(texts))
