"""Run several tasks on one set of parameters: fetch and prepare once, score as often as asked;
a table for the terminal, the results as JSON beside the run (model_path/eval_tasks.json), and
flat `task_NAME_METRIC` figures for metrics.jsonl."""

from __future__ import annotations

import json
import os
import time

from ..errors import UserError
from .base import TASKS, Prepared, get_task
from .data import fetch
from .per_document import prepare_documents
from .scorer import Scorer

RESULTS_FILE = "eval_tasks.json"


def check_names(names) -> list[str]:
    if isinstance(names, str):
        names = [names]
    names = list(dict.fromkeys(names or []))
    for name in names:
        get_task(name)
    return names


class TaskRunner:
    def __init__(self, cfg, tokenizer, names, *, task_data: str | None = None, limit: int = 0,
                 stride: int | None = None, documents=None, mesh=None, log=print):
        names = check_names(names)
        if task_data and os.path.isfile(task_data) and len(names) > 1:
            raise UserError(f"--task_data {task_data} is one file but {len(names)} tasks were asked for: "
                            "give a directory holding each task's file")
        if stride is not None and not 1 <= stride <= cfg.n_ctx:
            raise UserError(f"--stride {stride} must be between 1 and n_ctx ({cfg.n_ctx})")
        self.scorer, self.log = Scorer(cfg, mesh), log
        self.prepared: dict[str, tuple[Prepared, str]] = {}
        for name in names:
            fetched = [fetch(f, name, task_data) for f in get_task(name).files]
            kind = fetched[0].kind if len({f.kind for f in fetched}) == 1 else "mixed"
            if kind == "unpinned":
                log(f"{name}: {', '.join(os.path.basename(f.path) + ' sha256 ' + f.sha256 for f in fetched)} "
                    "(no published hash to compare with)")
            self.prepared[name] = (get_task(name).prepare([f.path for f in fetched], tokenizer, cfg.n_ctx,
                                                          limit, stride), kind)
        if documents:
            self.prepared["per_document"] = (prepare_documents(documents, tokenizer, cfg.n_ctx, limit), "user")

    def run(self, params) -> dict[str, dict]:
        out = {}
        for name, (prepared, kind) in self.prepared.items():
            start = time.perf_counter()
            ll, greedy = self.scorer.score(params, prepared.requests)
            seconds = time.perf_counter() - start
            out[name] = {**prepared.finish(ll, greedy), "items": prepared.items, "data": kind,
                         "items_per_s": prepared.items / seconds if seconds > 0 else None}
        return out


def headline(name: str, metrics: dict) -> float | None:
    task = TASKS.get(name)
    return metrics.get(task.headline if task else "word_perplexity")


def flat(results: dict[str, dict]) -> dict:
    """{'hellaswag': {'acc': 0.3}} -> {'task_hellaswag_acc': 0.3} (numbers only)."""
    return {f"task_{name}_{k}": v for name, metrics in results.items() for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "items_per_s"}


def table(results: dict[str, dict]) -> str:
    rows = [("task", "metric", "value", "items", "data")]
    for name, metrics in results.items():
        for k, v in metrics.items():
            if k in ("items", "data", "items_per_s"):
                continue
            rows.append((name, k, f"{v:.4f}", str(metrics["items"]), metrics["data"]))
            name = ""
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(c.rjust(w) if i in (2, 3) else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     .rstrip() for r in rows)


def write_results(model_path: str, record: dict) -> str:
    import fsspec
    path = model_path.rstrip("/") + "/" + RESULTS_FILE
    fs, local = fsspec.core.url_to_fs(path)
    fs.makedirs(os.path.dirname(local) or ".", exist_ok=True)
    with fs.open(local, "w") as f:
        f.write(json.dumps(record, indent=1) + "\n")
    return path
