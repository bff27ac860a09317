"""HellaSwag (validation): pick the right ending of four.

Two ways of scoring are in use, and both are reported:
- completion-style, as llm.c and nanoGPT's successors report it during training: the context is
  the item's `ctx`, each ending " " + ending tokenized on its own; `acc` picks the ending of the
  highest total log-likelihood, `acc_norm` of the highest per token (GPT-2 124M: 0.2859 / 0.2955).
- multiple-choice, as lm-evaluation-harness's `hellaswag`: the query is "activity_label: ctx_a
  Ctx_b" with WikiHow's bracketed markers removed, the endings likewise cleaned; `mc_acc` by total
  log-likelihood, `mc_acc_norm` by log-likelihood per character of the ending (124M: 0.2892 / 0.3114).
"""

from __future__ import annotations

import json
import re

import numpy as np

from .base import Prepared, continuation_tokens, first, register_task
from .data import DataFile
from .scorer import pair_request

FILE = DataFile(("hellaswag_val.jsonl",),
                url="https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl",
                fixture_sha256=("0866e9ba82a9952f4c6c8d157b526863dbb3c5b05dbf53650574009a0187eca2",))


def clean(text: str) -> str:
    """The harness's cleaning: WikiHow's " [title]" becomes a full stop, other [markers] go."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def read_items(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@register_task("hellaswag", files=(FILE,), headline="acc_norm",
               doc="HellaSwag validation: acc/acc_norm completion-style (llm.c), mc_acc/mc_acc_norm as lm-evaluation-harness")
def prepare(paths, tokenizer, n_ctx, limit=0, stride=None) -> Prepared:
    items = first(read_items(paths[0]), limit)
    requests, n_tokens, n_chars, labels = [], [], [], []
    for item in items:
        ctx = tokenizer.encode(item["ctx"])
        for ending in item["endings"]:
            cont = tokenizer.encode(" " + ending)
            requests.append(pair_request(ctx, cont, n_ctx))
            n_tokens.append(len(cont))
        query = clean(item["activity_label"] + ": " + item["ctx_a"] + " " + item["ctx_b"].capitalize())
        for ending in item["endings"]:
            choice = clean(ending)
            requests.append(pair_request(*continuation_tokens(tokenizer, query, " " + choice), n_ctx))
            n_chars.append(len(choice))
        labels.append(int(item["label"]))
    n_end = len(items[0]["endings"]) if items else 4

    def finish(ll: np.ndarray, greedy: np.ndarray) -> dict:
        ll = ll.reshape(len(items), 2, n_end)
        gold = np.asarray(labels)
        completion, choice = ll[:, 0], ll[:, 1]
        per_token = completion / np.asarray(n_tokens).reshape(len(items), n_end)
        per_char = choice / np.asarray(n_chars).reshape(len(items), n_end)
        score = lambda s: float(np.mean(np.argmax(s, axis=1) == gold))  # noqa: E731
        return {"acc": score(completion), "acc_norm": score(per_token),
                "mc_acc": score(choice), "mc_acc_norm": score(per_char)}

    return Prepared(requests, finish, len(items))
