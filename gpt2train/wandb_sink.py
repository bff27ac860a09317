"""Weights & Biases as one more destination of a run's metrics (a sink of metrics.MetricsWriter):
the same scalar records as metrics.jsonl, the config, the samples as a table, the curves image.

Only process 0 logs (the writer is disabled elsewhere). The run's W&B id is kept in
model_path/wandb_run_id, so a restarted run continues the same W&B run. Records are logged
against our own "step" (define_metric), not W&B's internal counter: a resumed run logs again the
steps after its checkpoint, which W&B's own step would refuse as going backwards.
WANDB_MODE=offline writes the run under model_path/wandb (or WANDB_DIR) for `wandb sync`.
"""

from __future__ import annotations

import os
import secrets
import string

import fsspec

from .config import Config
from .errors import UserError
from .paths import local_path

RUN_ID_FILE = "wandb_run_id"


def check_installed(cfg: Config) -> None:
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise UserError(f"wandb_project is {cfg.wandb_project!r} but the wandb package is not installed: "
                        "pip install -e \".[wandb]\" (or set wandb_project to \"\")") from None


def run_id(model_path: str) -> str:
    """The W&B run id of this model_path: the one kept there, else a new one, kept."""
    path = model_path.rstrip("/") + "/" + RUN_ID_FILE
    fs, p = fsspec.core.url_to_fs(path)
    if fs.exists(p):
        with fs.open(p, "r") as f:
            kept = f.read().strip()
        if kept:
            return kept
    new = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # W&B's id alphabet
    fs.makedirs(p.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(p, "w") as f:
        f.write(new + "\n")
    return new


class WandbSink:
    def __init__(self, cfg: Config):
        import wandb
        self.wandb = wandb
        local = local_path(cfg.model_path)
        directory = os.environ.get("WANDB_DIR") or local
        if directory:
            os.makedirs(directory, exist_ok=True)
        try:
            self.run = wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity or None,
                                  name=cfg.wandb_run_name or None, id=run_id(cfg.model_path), resume="allow",
                                  config=cfg.to_dict(), dir=directory)
        except Exception as e:  # wandb's own errors (no API key, no network) have no common base we can name
            if not type(e).__module__.startswith("wandb"):
                raise
            raise UserError(f"Weights & Biases could not start ({type(e).__name__}: {str(e).splitlines()[0]}): run "
                            "`wandb login` or set WANDB_API_KEY, set WANDB_MODE=offline to log without a network, or "
                            "set wandb_project to \"\"") from None
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def scalars(self, record: dict) -> None:
        self.run.log(record)

    def samples(self, step: int, rows: list[dict]) -> None:
        table = self.wandb.Table(columns=["step", "prompt", "text"],
                                 data=[[step, r["prompt"], r["text"]] for r in rows])
        self.run.log({"step": step, "samples": table})

    def image(self, tag: str, path: str, step: int) -> None:
        if local_path(path) is not None:
            self.run.log({"step": step, tag: self.wandb.Image(path)})

    def close(self) -> None:
        self.run.finish()
