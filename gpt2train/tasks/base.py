"""The task registry: each task names its data files, turns them into scoring requests once, and
turns the requests' scores into its metrics.

    @register_task("name", files=(DataFile(...),), headline="acc", doc="...")
    def prepare(paths, tokenizer, n_ctx, limit, stride) -> Prepared

`prepare` reads and tokenizes the items (the first `limit`, 0 for all); `Prepared.finish` gets
each request's log-likelihood and all-greedy flag (scorer.Scorer) and returns the metrics. A
training run prepares once and scores at every evaluation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..errors import UserError
from .data import DataFile
from .scorer import Request


@dataclass
class Prepared:
    requests: list[Request]
    finish: Callable[[np.ndarray, np.ndarray], dict]
    items: int


@dataclass(frozen=True)
class Task:
    name: str
    files: tuple[DataFile, ...]
    headline: str  # the metric the progress line shows
    doc: str
    prepare: Callable[..., Prepared]


TASKS: dict[str, Task] = {}


def register_task(name: str, *, files: tuple[DataFile, ...], headline: str, doc: str):
    def add(prepare):
        TASKS[name] = Task(name, files, headline, doc, prepare)
        return prepare
    return add


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}: choose from {', '.join(TASKS)}")
    return TASKS[name]


def first(items: list, limit: int) -> list:
    return items[:limit] if limit else items


def continuation_tokens(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation tokens the way lm-evaluation-harness splits them: spaces ending
    the context move to the continuation, the pair is tokenized whole, and the continuation is
    what follows the context's own tokens (BPE may merge across the seam)."""
    moved = len(context) - len(context.rstrip())
    if moved:
        context, continuation = context[:-moved], context[-moved:] + continuation
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return ctx, whole[len(ctx):]
