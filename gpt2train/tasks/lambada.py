"""LAMBADA (OpenAI's version): predict a passage's last word.

Scored as lm-evaluation-harness's `lambada_openai`: the context is the passage up to its last
space, the target " " + the last word. `acc`: every token of the target is the model's top
choice (greedy); `perplexity`: exp(-mean over passages of the target's log-likelihood), the
harness's figure. `token_perplexity` is exp of the mean loss per target token. The GPT-2 paper's
45.99 / 35.13 came from OpenAI's own pipeline (its accuracy used a stop-word filter on
generated words), which was not published; the harness's figures for GPT-2 124M are 0.3256 / 40.06.
"""

from __future__ import annotations

import json
import math

import numpy as np

from .base import Prepared, continuation_tokens, first, register_task
from .data import DataFile
from .scorer import pair_request

FILE = DataFile(("lambada_test_en.jsonl",), hub=("EleutherAI/lambada_openai", "data/lambada_test_en.jsonl"),
                fixture_sha256=("737caa763cb46191b909313fec5da6767bed23c2b554f00600e374ae908597f6",))


def read_passages(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


@register_task("lambada", files=(FILE,), headline="acc",
               doc="LAMBADA (OpenAI): last-word accuracy and perplexity, as lm-evaluation-harness's lambada_openai")
def prepare(paths, tokenizer, n_ctx, limit=0, stride=None) -> Prepared:
    passages = first(read_passages(paths[0]), limit)
    requests, target_tokens = [], []
    for text in passages:
        context, word = text.rsplit(" ", 1) if " " in text else ("", text)
        ctx, cont = continuation_tokens(tokenizer, context, " " + word)
        if not ctx:
            ctx = [tokenizer.eot_id]  # an empty context is <|endoftext|>, as in the harness
        requests.append(pair_request(ctx, cont, n_ctx))
        target_tokens.append(len(cont))

    def finish(ll: np.ndarray, greedy: np.ndarray) -> dict:
        return {"acc": float(np.mean(greedy)), "perplexity": math.exp(-float(np.mean(ll))),
                "token_perplexity": math.exp(-float(np.sum(ll)) / sum(target_tokens))}

    return Prepared(requests, finish, len(passages))
