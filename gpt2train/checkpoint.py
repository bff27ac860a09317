"""Orbax checkpoints of the train state plus the data position, in model_path/checkpoints.

Orbax writes each step to a temporary directory and renames it only when complete, so a
kill in the middle of a save leaves the previous checkpoints intact and readable.
"""

from __future__ import annotations

import contextlib
import json
import logging

import fsspec
import jax
import orbax.checkpoint as ocp

from .config import SHAPE_KEYS, Config
from .errors import UserError
from .paths import checkpoint_dir

# A checkpoint only fits a config that agrees on the model's shape and the padded vocabulary.
CHECKPOINT_SHAPE_KEYS = (*SHAPE_KEYS, "pad_vocab_to")

logging.getLogger("absl").setLevel(logging.WARNING)


BEST = "best"  # model_path/best: the checkpoint with the lowest eval loss (keep_best), apart from the rolling ones


class Checkpointer:
    """The run's rolling checkpoints (model_path/checkpoints), or with name="best" the one best
    checkpoint (model_path/best: parameters only, never counted by keep_checkpoints)."""

    def __init__(self, cfg: Config, *, create: bool = True, name: str = "checkpoints"):
        self.cfg = cfg
        self.dir = checkpoint_dir(cfg.model_path, name)
        # cleanup_tmp_directories: a save killed half-way leaves a temporary directory; drop it.
        opts = ocp.CheckpointManagerOptions(max_to_keep=1 if name == BEST else cfg.keep_checkpoints, create=create,
                                            cleanup_tmp_directories=create)
        self.manager = ocp.CheckpointManager(self.dir, options=opts)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, data_state: dict, *, kind: str = "training", hooks: dict | None = None,
             **extra) -> None:
        """kind "training": a full training state; "pretrained" or "best": {"params"} only. `hooks`:
        what the training hooks keep across restarts (Trainer.hook_state); `extra`: more metadata."""
        # A copy taken now (the save finishes in the background while the hooks change their state).
        meta = {"data": data_state, "config": self.cfg.to_dict(), "kind": kind,
                "hooks": json.loads(json.dumps(hooks or {})), **extra}
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def read_meta(self, step: int) -> dict:
        """The step's metadata (data position, config), after checking the model shape fits."""
        with _readable(self.dir, step):
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        check_compatible(self.cfg, meta["config"], self.dir)
        return meta

    def restore_state(self, step: int, args: ocp.args.CheckpointArgs):
        with _readable(self.dir, step):
            return self.manager.restore(step, args=ocp.args.Composite(state=args)).state

    def restore(self, abstract_state, step: int | None = None):
        """Return (state, data_state) of `step` (default: latest) shaped like abstract_state."""
        step = self.latest_step() if step is None else step
        meta = self.read_meta(step)
        return self.restore_state(step, ocp.args.StandardRestore(abstract_state)), meta["data"]

    def restore_params(self, step: int, sharding=None):
        """Only the parameters of a step (of either kind of checkpoint)."""
        from . import model
        abstract = model.abstract_params(self.cfg)
        if sharding is None:
            sharding = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), abstract)
        abstract = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), abstract, sharding)
        item = {"params": abstract}
        return self.restore_state(step, ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True))["params"]

    def delete_from(self, step: int) -> None:
        """Delete the checkpoints of `step` and later (written by a run that a restart went back on)."""
        for later in [s for s in self.all_steps() if s >= step]:
            self.manager.delete(later)

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def check_compatible(cfg: Config, saved: dict, where: str) -> None:
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs config {getattr(cfg, k)!r}"
             for k in CHECKPOINT_SHAPE_KEYS if saved.get(k) != getattr(cfg, k)]
    if diffs:
        raise UserError(f"the checkpoint in {where} was trained with another model shape ("
                        + "; ".join(diffs) + "). Use a new model_path, or the config it was trained with.")


def parse_which(text: str | None) -> str | int:
    """--checkpoint's value: "best", "last" (the default) or a step number."""
    if text is None or text == "last":
        return "last"
    if text == "best":
        return "best"
    if text.isdigit():
        return int(text)
    raise UserError(f"--checkpoint {text!r}: give best, last or a step number")


def load_params(cfg: Config, step: int | None = None, sharding=None, *, which: str | int = "last"):
    """Just the parameters of a checkpoint, for generation and evaluation (on one device, or with
    `sharding`, a tree of shardings such as the mesh's): the latest (which="last"), the one with
    the lowest eval loss (which="best", kept by keep_best) or a given step (`step`, or which=N)."""
    if isinstance(which, int):
        step = which
    name = BEST if which == "best" else "checkpoints"
    ckpt = Checkpointer(cfg, create=False, name=name) if _exists(cfg.model_path, name) else None
    if ckpt is None or ckpt.latest_step() is None:
        if name == BEST:
            raise UserError(f"no best checkpoint in {checkpoint_dir(cfg.model_path, BEST)}: train with "
                            "keep_best: true (and evaluation: eval_data_path, eval_steps > 0), or use --checkpoint last")
        raise UserError(f"no checkpoint found in {checkpoint_dir(cfg.model_path)}: train first "
                        f"(python3 main.py --model <config>) or point model_path at a trained model")
    step = ckpt.latest_step() if step is None else step
    if step not in ckpt.all_steps():
        steps = ", ".join(map(str, ckpt.all_steps()))
        ckpt.close()
        raise UserError(f"there is no checkpoint of step {step} in {ckpt.dir}; it holds steps {steps} "
                        "(older ones are removed: keep_checkpoints)")
    ckpt.read_meta(step)
    params = ckpt.restore_params(step, sharding)
    ckpt.close()
    return params, step


@contextlib.contextmanager
def _readable(directory: str, step: int):
    """Turn a damaged checkpoint (files deleted or corrupted by hand) into a clear error."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:  # Orbax/TensorStore raise many types; all mean "cannot read this step"
        # Orbax's abandoned read tasks would log every missing array once more; one message is enough.
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        raise UserError(f"the checkpoint of step {step} in {directory} cannot be read "
                        f"({type(e).__name__}: {str(e)[:300]}). Move {directory}/{step} away to resume "
                        f"from an earlier checkpoint, or use a new model_path.") from None


def _exists(path: str, name: str = "checkpoints") -> bool:
    fs, p = fsspec.core.url_to_fs(checkpoint_dir(path, name))
    return fs.exists(p)
