"""Orbax checkpoints of the train state plus the data position, in model_path/checkpoints.

Orbax writes each step to a temporary directory and renames it only when complete, so a
kill in the middle of a save leaves the previous checkpoints intact and readable. Each step
holds three items: the state, its metadata (data position, config, encoder fingerprint) and
an integrity manifest (integrity.py: a checksum per array and of the metadata), computed
before the save and verified on every restore, so a checkpoint damaged on disk is refused
with its step and the array named instead of loading silently.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import posixpath
import sys

import fsspec
import jax
import orbax.checkpoint as ocp

from . import integrity
from .config import SHAPE_KEYS, Config
from .errors import UserError
from .paths import check_bucket, checkpoint_dir

# A checkpoint only fits a config that agrees on the model's shape and the padded vocabulary.
CHECKPOINT_SHAPE_KEYS = (*SHAPE_KEYS, "pad_vocab_to")

logging.getLogger("absl").setLevel(logging.WARNING)


def _quiet_failed_saves() -> None:
    """A save that fails (a full disk) makes Orbax's background threads log the same error with
    its traceback several times (~300 lines), and TensorStore's callbacks report a closed event
    loop. Checkpointer turns the failure into one UserError naming the cause, so those repeats
    are dropped: Orbax's error records, and that one RuntimeError wherever Python reports it."""
    class DropOrbaxErrors(logging.Filter):
        def filter(self, record):
            return not (record.levelno >= logging.ERROR and "orbax" in record.pathname)

    logging.getLogger("absl").addFilter(DropOrbaxErrors())
    def closed_loop(value) -> bool:
        return isinstance(value, RuntimeError) and str(value) == "Event loop is closed"

    previous_hook, previous_unraisable = sys.excepthook, sys.unraisablehook

    def excepthook(kind, value, tb):
        if not closed_loop(value):
            previous_hook(kind, value, tb)

    def unraisablehook(unraisable):  # how TensorStore's callbacks report it, with no object named
        if not closed_loop(unraisable.exc_value):
            previous_unraisable(unraisable)

    sys.excepthook, sys.unraisablehook = excepthook, unraisablehook


_quiet_failed_saves()


BEST = "best"  # model_path/best: the checkpoint with the lowest eval loss (keep_best), apart from the rolling ones


class Checkpointer:
    """The run's rolling checkpoints (model_path/checkpoints), or with name="best" the one best
    checkpoint (model_path/best: parameters only, never counted by keep_checkpoints)."""

    def __init__(self, cfg: Config, *, create: bool = True, name: str = "checkpoints"):
        self.cfg = cfg
        self.dir = checkpoint_dir(cfg.model_path, name)
        if create:
            check_bucket(self.dir, "model_path")  # one line, not Orbax's traceback, for a missing or refused bucket
        # cleanup_tmp_directories: a save killed half-way leaves a temporary directory; drop it.
        opts = ocp.CheckpointManagerOptions(max_to_keep=1 if name == BEST else cfg.keep_checkpoints, create=create,
                                            cleanup_tmp_directories=create)
        self.manager = ocp.CheckpointManager(self.dir, options=opts)
        self.manifests: dict[int, dict | None] = {}  # per step read: its integrity manifest, None if it has none

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, data_state: dict, *, kind: str = "training", encoder: str | None = None,
             hooks: dict | None = None, **extra) -> None:
        """kind "training": a full training state; "pretrained" or "best": {"params"} only.
        `encoder`: the fingerprint of the vocabulary the model was trained with (tokenizer.py);
        `hooks`: what the training hooks keep across restarts (Trainer.hook_state); `extra`: more metadata."""
        # A copy taken now (the save finishes in the background while the hooks change their state).
        meta = {"data": data_state, "config": self.cfg.to_dict(), "kind": kind, "encoder": encoder,
                "hooks": json.loads(json.dumps(hooks or {})), **extra}
        manifest = integrity.manifest(state, meta)  # of the state in memory, before any byte is written
        self._saving = step
        with self._writing(step):
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta),
                integrity=ocp.args.JsonSave(manifest)), force=True)

    def wait(self) -> None:
        """Return when the last save is on disk; a failed save is a UserError naming the cause."""
        with self._writing(getattr(self, "_saving", None)):
            self.manager.wait_until_finished()

    @contextlib.contextmanager
    def _writing(self, step):
        try:
            yield
        except UserError:
            raise
        except Exception as e:  # Orbax/TensorStore wrap the OSError of a full disk in their own types
            logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # the abandoned tasks' tracebacks
            complete = [s for s in self.all_steps() if s != step]
            last = f"step {complete[-1]}" if complete else "none yet"
            raise SaveFailed(f"saving the checkpoint of step {step} in {self.dir} failed ({_root_cause(e)}); "
                            f"the newest complete checkpoint is {last}, nothing before it is lost: free disk space "
                            "or fix the directory's permissions, then rerun to resume") from None

    def has_manifest(self, step: int) -> bool:
        fs, p = fsspec.core.url_to_fs(posixpath.join(self.dir, str(step), "integrity"))
        return fs.exists(p)

    def read_meta(self, step: int) -> dict:
        """The step's metadata (data position, config, encoder), after checking it is the one saved
        (when the step has a manifest) and that the model shape fits."""
        items = {"meta": ocp.args.JsonRestore()}
        if self.has_manifest(step):
            items["integrity"] = ocp.args.JsonRestore()
        with _readable(self.dir, step):
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        meta = restored.meta
        self.manifests[step] = restored.get("integrity") if "integrity" in items else None
        if self.manifests[step] is not None:
            integrity.verify_meta(self.manifests[step], meta, step, self.dir)
        check_compatible(self.cfg, meta["config"], self.dir)
        return meta

    def verified(self, step: int) -> bool:
        """Whether `step` was checked against its manifest when read (older checkpoints have none)."""
        return self.manifests.get(step) is not None

    def restore_state(self, step: int, args: ocp.args.CheckpointArgs):
        with _readable(self.dir, step):
            return self.manager.restore(step, args=ocp.args.Composite(state=args)).state

    def restore(self, abstract_state, step: int | None = None):
        """Return (state, metadata) of `step` (default: latest) shaped like abstract_state,
        verified against the step's manifest."""
        step = self.latest_step() if step is None else step
        meta = self.read_meta(step)
        state = self.restore_state(step, ocp.args.StandardRestore(abstract_state))
        if self.verified(step):
            integrity.verify_arrays(self.manifests[step], state, step, self.dir)
        return state, meta

    def move_aside(self, steps: list[int]) -> str:
        """Move damaged steps out of the checkpoint directory (kept for inspection, never loaded
        again), so training from an earlier step can save those step numbers anew."""
        aside = posixpath.join(self.cfg.model_path.rstrip("/"), "damaged_checkpoints")
        if jax.process_index() == 0:  # one host moves; the others wait for it
            fs, root = fsspec.core.url_to_fs(aside)
            fs.makedirs(root, exist_ok=True)
            for step in steps:
                _, src = fsspec.core.url_to_fs(posixpath.join(self.dir, str(step)))
                fs.mv(src, posixpath.join(root, f"{step}-{os.getpid()}"), recursive=True)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("gpt2train: damaged checkpoints moved aside")
        self.manager.reload()
        return aside

    def restore_params(self, step: int, sharding=None):
        """Only the parameters of a step (of either kind of checkpoint)."""
        from . import model
        abstract = model.abstract_params(self.cfg)
        if sharding is None:
            sharding = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), abstract)
        abstract = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), abstract, sharding)
        item = {"params": abstract}
        params = self.restore_state(step, ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True))["params"]
        if step not in self.manifests:
            self.read_meta(step)
        if self.verified(step):
            integrity.verify_arrays(self.manifests[step], params, step, self.dir, prefix="params/")
        return params

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


def check_encoder(saved: str | None, tokenizer, step: int, where: str) -> None:
    """A model only fits the vocabulary it was trained with: compare the fingerprints."""
    if saved is not None and tokenizer is not None and saved != tokenizer.fingerprint:
        raise UserError(f"the checkpoint of step {step} in {where} was trained with the vocabulary {saved}, but "
                        f"encoder_path {tokenizer.name!r} holds the vocabulary {tokenizer.fingerprint}: set "
                        "encoder_path to the encoder the model was trained with")


def parse_which(text: str | None) -> str | int:
    """--checkpoint's value: "best", "last" (the default) or a step number."""
    if text is None or text == "last":
        return "last"
    if text == "best":
        return "best"
    if text.isdigit():
        return int(text)
    raise UserError(f"--checkpoint {text!r}: give best, last or a step number")


def load_params(cfg: Config, step: int | None = None, sharding=None, tokenizer=None, *, which: str | int = "last"):
    """Just the parameters of a checkpoint, for generation and evaluation (on one device, or with
    `sharding`, a tree of shardings such as the mesh's): the latest (which="last"), the one with
    the lowest eval loss (which="best", kept by keep_best) or a given step (`step`, or which=N);
    checked against the step's manifest and, given the `tokenizer` to use them with, its vocabulary."""
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
    check_encoder(ckpt.read_meta(step).get("encoder"), tokenizer, step, ckpt.dir)
    params = ckpt.restore_params(step, sharding)
    ckpt.close()
    return params, step


class SaveFailed(UserError):
    """A save that could not be written (disk full, permissions). Orbax's abandoned writes may
    still call back into Python while the interpreter shuts down, each printing a traceback, so
    the command line exits at once after the message (cli.guarded)."""

    exit_at_once = True


class UnreadableCheckpoint(UserError):
    """A checkpoint whose files are missing or cannot be parsed."""


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
        raise UnreadableCheckpoint(f"the checkpoint of step {step} in {directory} cannot be read "
                        f"({type(e).__name__}: {str(e)[:300]}). Move {directory}/{step} away to resume "
                        f"from an earlier checkpoint, or use a new model_path.") from None


def _root_cause(e: BaseException) -> str:
    """The OSError at the bottom of a chain of wrapped exceptions, else the first line of `e`."""
    seen = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return f"{seen.strerror}" + (f": {seen.filename}" if seen.filename else "")
        seen = seen.__cause__ or seen.__context__
    text = str(e)
    # TensorStore reports the OS's reason inside its own message: name it first.
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO):
        if os.strerror(code) in text:
            return f"{os.strerror(code)}: {type(e).__name__}: {text.splitlines()[0][:200]}"
    return f"{type(e).__name__}: {text.strip().splitlines()[0][:300] if text.strip() else ''}"


def _exists(path: str, name: str = "checkpoints") -> bool:
    fs, p = fsspec.core.url_to_fs(checkpoint_dir(path, name))
    return fs.exists(p)
