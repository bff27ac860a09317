"""Load, validate and override a model config: the seed's JSON keys plus a few new ones.

Every key has a default and a one-line description here; this table is the documentation
(`python -m gpt2train keys` prints it; option_docs.py turns it into docs/options.md). Three of the
seed's names say little of what they do; each has a readable alias (ALIASES) that means the same.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import fsspec

from .errors import UserError
from .optimizers import OPTIMIZERS

PRECISIONS = ("float32", "bfloat16")
DECAY_TYPES = ("pow", "adam")
REMAT_POLICIES = ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable")
KERNELS = ("auto", "cpu", "standard")
WINDOW_ORDERS = ("random", "sequential")


# The keys that fix the parameter shapes (a checkpoint or a pretrained model fits a config only
# when they agree; n_ctx may be shortened when fine-tuning).
SHAPE_KEYS = ("n_vocab", "n_ctx", "n_embd", "n_layer", "n_head")
# Readable names for three of the seed's keys; either name may be used, not both with different values.
ALIASES = {"eval_every": "train_steps", "log_every": "iterations", "eval_batches": "eval_steps",
           "time_limit": "max_train_seconds"}


@dataclass(frozen=True)
class Check:
    """What values a key accepts beyond its type, phrased for the error and the docs."""

    what: str | Callable[[], str]  # a callable phrase is read when shown: a registry may grow after import
    accepts: Callable[[Any], bool]

    @property
    def phrase(self) -> str:
        return self.what() if callable(self.what) else self.what


POSITIVE = Check("positive", lambda v: v > 0)
AT_LEAST_0 = Check(">= 0", lambda v: v >= 0)
FRACTION = Check("in [0, 1]", lambda v: 0 <= v <= 1)
DECAY_RATE = Check("in [0, 1)", lambda v: 0 <= v < 1)

# Keys whose default is None hold lists or objects; None (not set) always passes.
TASK_NAMES = Check("a list of task names", lambda v: v is None or (isinstance(v, list) and all(isinstance(t, str) for t in v)))
PROMPTS = Check("a list of strings or a file name",
                lambda v: v is None or isinstance(v, str) or (isinstance(v, list) and all(isinstance(p, str) for p in v)))
SAMPLING_OPTIONS = Check("an object of sampling options", lambda v: v is None or isinstance(v, (dict, str)))
WEIGHTS = Check("a list of numbers", lambda v: v is None or (isinstance(v, list) and all(
    isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in v)))
COLUMN_NAME = Check("a column name", lambda v: bool(v))


def one_of(choices: Collection[str]) -> Check:
    """Membership in `choices`, looked up when checked (OPTIMIZERS gains names registered later)."""
    return Check(lambda: f"one of {tuple(choices)}", lambda v: v in choices)


def _key(default, doc: str, seed: bool = False, *, check: Check | None = None):
    return field(default=default, metadata={"doc": doc, "seed": seed, "check": check})


@dataclass
class Config:
    # --- the seed's keys ---
    model: str = _key("GPT2", "model family; only GPT2", True, check=one_of(("GPT2",)))
    n_ctx: int = _key(1024, "context length in tokens", True, check=POSITIVE)
    n_embd: int = _key(768, "width of the residual stream", True, check=POSITIVE)
    n_layer: int = _key(12, "number of transformer blocks", True, check=POSITIVE)
    n_head: int = _key(12, "attention heads per block (must divide n_embd)", True, check=POSITIVE)
    n_vocab: int = _key(50257, "vocabulary size; must equal the tokenizer's (50257 for GPT-2)", True, check=POSITIVE)
    scale_by_depth: bool = _key(True, "init residual projections with std 0.02/sqrt(2*n_layer)", True)
    scale_by_in: bool = _key(False, "init matmul weights with std 1/sqrt(fan_in) instead of 0.02", True)
    precision: str = _key("float32", "compute dtype: float32 or bfloat16 (weights stay float32)", True, check=one_of(PRECISIONS))
    input: str = _key("text", "registered input function that feeds training and eval", True)
    lr: float = _key(2.5e-4, "peak learning rate", True, check=AT_LEAST_0)
    warmup_steps: int = _key(2000, "linear warmup steps from 0 to lr", True, check=AT_LEAST_0)
    opt_name: str = _key("adam", "optimizer: adam (it is AdamW when weight_decay > 0), adamw or adafactor", True, check=one_of(OPTIMIZERS))
    weight_decay: float = _key(0.01, "decoupled weight decay on matrices (not biases, LayerNorm)", True, check=AT_LEAST_0)
    beta1: float = _key(0.9, "first-moment decay (adafactor: momentum, 0 disables it)", True, check=DECAY_RATE)
    beta2: float = _key(0.98, "second-moment decay (adam; adafactor with decay_type adam)", True, check=DECAY_RATE)
    epsilon: float = _key(1e-9, "optimizer epsilon", True)
    decay_type: str = _key("pow", "adafactor second-moment schedule: pow or adam", True, check=one_of(DECAY_TYPES))
    decay_exponent: float = _key(0.8, "adafactor pow schedule: decay = 1 - (step+1)^-exponent", True)
    train_steps: int = _key(1000, "train steps between evaluations", True, check=POSITIVE)
    eval_steps: int = _key(10, "batches per evaluation (0 disables evaluation)", True, check=AT_LEAST_0)
    max_steps: int = _key(500000, "training stops exactly at this step", True, check=POSITIVE)
    iterations: int = _key(100, "steps between progress-bar/metric log lines", True, check=POSITIVE)
    embed_dropout: float = _key(0.1, "dropout on token+position embeddings", True, check=FRACTION)
    attn_dropout: float = _key(0.1, "dropout on attention probabilities", True, check=FRACTION)
    res_dropout: float = _key(0.1, "dropout on each residual branch output", True, check=FRACTION)
    model_path: str = _key("", "directory for checkpoints, metrics and logs", True)
    data_path: Any = _key("", "training data: file, directory, glob or list", True)
    encoder_path: str = _key("", "directory with encoder.json and vocab.bpe ('' = GPT-2's, shipped with the package)", True)
    train_batch_size: int = _key(8, "global sequences per optimizer step", True, check=POSITIVE)
    eval_batch_size: int = _key(8, "global sequences per eval batch", True, check=POSITIVE)
    predict_batch_size: int = _key(1, "samples generated in parallel", True, check=POSITIVE)
    predict_path: str = _key("", "file that generated samples are appended to ('' = model_path/predictions.txt)", True)
    # --- new keys ---
    eval_data_path: Any = _key(None, "held-out data: file, directory, glob or list (None: no eval)")
    seed: int = _key(0, "seed for init, data order and dropout", check=AT_LEAST_0)
    grad_clip: float = _key(1.0, "clip gradients to this global norm (0 disables)", check=AT_LEAST_0)
    grad_accum_steps: int = _key(1, "micro-batches per optimizer step (train_batch_size is split)", check=POSITIVE)
    min_lr_ratio: float = _key(0.1, "cosine decay ends at lr * min_lr_ratio at max_steps", check=FRACTION)
    checkpoint_every: int = _key(0, "save a checkpoint every N steps (0: at every evaluation)", check=AT_LEAST_0)
    keep_checkpoints: int = _key(3, "how many recent checkpoints to keep", check=POSITIVE)
    checkpoint_every_seconds: float = _key(0.0, "also save a checkpoint when this many seconds passed since the last save (0: off)", check=AT_LEAST_0)
    resume_fallback: bool = _key(False, "when the newest checkpoint is damaged, move it aside and resume from the newest intact one")
    allow_data_change: bool = _key(False, "resume although the data settings differ from the checkpoint's (the new data starts from its beginning)")
    keep_best: bool = _key(False, "also keep the checkpoint with the lowest eval loss, in model_path/best (never removed by keep_checkpoints)")
    early_stop_patience: int = _key(0, "stop after this many evaluations without a lower eval loss (0: never)", check=AT_LEAST_0)
    max_train_seconds: float = _key(0.0, "stop at the first step past this much training time, save and exit 0 (0: no limit); a number of seconds or a duration such as 50m, 1h30m", check=AT_LEAST_0)
    time_limit_total: bool = _key(False, "count max_train_seconds across restarts (the time used is kept in each checkpoint) instead of afresh per run")
    sample_every: int = _key(0, "generate samples every N steps and at the end, to the log, samples.jsonl and TensorBoard (0: never)", check=AT_LEAST_0)
    sample_prompts: Any = _key(None, "prompts for sample_every: a list, or a file with one prompt per line (None: one sample from <|endoftext|>)", check=PROMPTS)
    sample_options: Any = _key(None, "sampling options for sample_every, as generate takes them, e.g. {\"length\": 64, \"top_k\": 40}", check=SAMPLING_OPTIONS)
    plot_every_eval: bool = _key(True, "redraw model_path/curves.png at every evaluation (needs matplotlib: pip install -e \".[plot]\")")
    wandb_project: str = _key("", "log scalars, the config, samples and curves to this Weights & Biases project (pip install -e \".[wandb]\")")
    wandb_run_name: str = _key("", "the W&B run's display name ('' : W&B picks one)")
    wandb_entity: str = _key("", "the W&B team or user the project belongs to ('' : your default)")
    pad_vocab_to: int = _key(128, "pad the embedding rows to a multiple of this (logits masked); 1 = no padding", check=POSITIVE)
    remat: bool = _key(False, "recompute block activations in the backward pass to save memory")
    mesh_data: int = _key(0, "devices along the data axis of the mesh (0: all devices not used by mesh_fsdp)", check=AT_LEAST_0)
    mesh_fsdp: int = _key(1, "devices parameters and optimizer state are sharded over (FSDP); 1 = replicated", check=POSITIVE)
    remat_policy: str = _key("nothing_saveable", "with remat: what a block keeps for backward (nothing_saveable, dots_saveable, dots_with_no_batch_dims_saveable)", check=one_of(REMAT_POLICIES))
    init_from: str = _key("", "start training from a pretrained model: 124M/355M/774M/1558M or a checkpoint directory")
    long_data_path: Any = _key(None, "long documents (.tfrecords) for the openwebtext_long and openwebtext_longbiased inputs")
    long_eval_data_path: Any = _key(None, "held-out long documents for openwebtext_long (default: eval_data_path)")
    data_weights: Any = _key(None, "tfrecords input: one sampling weight per data_path entry (a mixture)", check=WEIGHTS)
    stitch: int = _key(0, "documents joined per window group (0: enough minimum_size documents for one window)", check=AT_LEAST_0)
    minimum_size: int = _key(128, "smallest document (tokens) in the records; sets stitch when stitch is 0", check=AT_LEAST_0)
    skip_corrupt_records: bool = _key(False, "skip (and count) damaged records instead of stopping")
    prefetch: int = _key(4, "batches read ahead in a background thread (0: read in the training loop)", check=AT_LEAST_0)
    window_order: str = _key("random", "bin and parquet inputs' training windows: random (nanoGPT: drawn per batch, seeded) or sequential (in file order, as llm.c)", check=one_of(WINDOW_ORDERS))
    text_field: str = _key("text", "the text column of Parquet files and the text field of JSONL lines", check=COLUMN_NAME)
    readers: int = _key(4, "parquet input: row groups read and tokenized ahead by this many threads", check=POSITIVE)
    scan_unroll: int = _key(0, "layers per scan step: 1 compiles fastest, n_layer runs fastest (0: all if n_layer <= 12, else 1)", check=AT_LEAST_0)
    inference_precision: str = _key("auto", "generate, evaluate and serve: float32, bfloat16 (weight matrices held in bfloat16: half the bytes per token) or auto (bfloat16 where the hardware computes it natively: TPU, GPU, CPUs with AVX-512 BF16 or AMX; else precision)", check=one_of(("auto", *PRECISIONS)))
    kernels: str = _key("auto", "matmul and attention kernels: cpu (written for XLA:CPU), standard (fused attention, plain products: GPU/TPU) or auto (cpu on a CPU backend)", check=one_of(KERNELS))
    eval_tasks: Any = _key(None, "tasks scored during training, a list of lambada, hellaswag, wikitext2, wikitext103, enwik8 (None: none)", check=TASK_NAMES)
    eval_tasks_every: int = _key(0, "steps between task scores (0: at every evaluation, i.e. every train_steps)", check=AT_LEAST_0)
    eval_tasks_items: int = _key(0, "items per task scored during training (0: all; wikitext: articles, enwik8: lines)", check=AT_LEAST_0)
    task_data: str = _key("", "directory with local copies of the tasks' files ('' = download and cache them)")

    # ------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab(self) -> int:
        m = max(1, self.pad_vocab_to)
        return int(math.ceil(self.n_vocab / m) * m)

    @property
    def resolved_predict_path(self) -> str:
        if self.predict_path:
            return self.predict_path
        return (self.model_path.rstrip("/") + "/predictions.txt") if self.model_path else "predictions.txt"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "Config":
        return apply_overrides(self, changes)

    def validate(self) -> "Config":
        problems = []

        def need(cond, msg):
            if not cond:
                problems.append(msg)

        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), type(f.default)
            if f.default is None and f.name not in PATH_KEYS:  # lists and objects (data_weights, eval_tasks, sample_*): by their check below
                continue
            if f.name in PATH_KEYS:
                need(value is None or isinstance(value, str) or (isinstance(value, list) and value
                                                                  and all(isinstance(v, str) for v in value)),
                     f"{f.name} must be a path or a list of paths, got {value!r}")
            elif kind is float:
                need(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
                     f"{f.name} must be a finite number, got {value!r}")
            elif kind is int:
                need(isinstance(value, int) and not isinstance(value, bool), f"{f.name} must be a whole number, got {value!r}")
            else:
                need(isinstance(value, kind), f"{f.name} must be {_KINDS[kind]}, got {value!r}")
        if problems:  # the range checks below need values of the right types
            raise UserError("invalid config:\n  - " + "\n  - ".join(problems))
        for f in dataclasses.fields(self):  # each key's own bounds or choices, declared with it
            check, value = f.metadata["check"], getattr(self, f.name)
            if check is not None:
                need(check.accepts(value), f"{f.name} must be {check.phrase}, got {value!r}")
        if self.n_head > 0:
            need(self.n_embd % self.n_head == 0,
                 f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.grad_accum_steps > 0 and self.train_batch_size > 0:
            need(self.train_batch_size % self.grad_accum_steps == 0,
                 f"train_batch_size ({self.train_batch_size}) must be divisible by "
                 f"grad_accum_steps ({self.grad_accum_steps})")
        if problems:
            raise UserError("invalid config:\n  - " + "\n  - ".join(problems))
        return self


FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def nearest_key(name: str) -> str | None:
    match = difflib.get_close_matches(name, [*FIELDS, *ALIASES], n=1, cutoff=0.0)
    return match[0] if match else None


def parse_bool(text: str) -> bool:
    """A boolean written as text (a command-line value): 1/true/yes/on or 0/false/no/off."""
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


def parse_duration(value) -> float:
    """Seconds from a number or a duration such as "50m", "1h30m", "90s", "2.5h"."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    text = str(value).strip().lower().replace(" ", "")
    try:
        return float(text)
    except ValueError:
        pass
    parts = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?", text)
    if not text or parts is None:
        raise UserError(f"max_train_seconds (time_limit) must be seconds or a duration such as 50m, 1h30m or "
                        f"90s, got {value!r}")
    hours, minutes, seconds = (float(x) if x else 0.0 for x in parts.groups())
    return hours * 3600 + minutes * 60 + seconds


def canonical_keys(values: dict) -> dict:
    """`values` with aliases replaced by the seed's names; an alias beside its own key with
    another value is an error."""
    out = {k: v for k, v in values.items() if k not in ALIASES}
    for alias, name in ALIASES.items():
        if alias in values:
            if name in values and values[name] != values[alias]:
                raise UserError(f"{alias} is another name for {name}, and both are set ({alias}={values[alias]!r}, "
                                f"{name}={values[name]!r}): keep one")
            out[name] = values[alias]
    return out


PATH_KEYS = ("data_path", "eval_data_path", "long_data_path", "long_eval_data_path")
_KINDS = {bool: "true or false", int: "an int (a whole number)", float: "a number", str: "a string"}


def _strict(name: str, value: Any) -> Any:
    """A JSON (or Python) value of the key's own type: no bool or string passes as a number, no
    number as a string; a whole float (2.0) is accepted as an int."""
    kind = type(FIELDS[name].default)
    ok = {bool: isinstance(value, bool),
          int: (isinstance(value, int) and not isinstance(value, bool))
          or (isinstance(value, float) and math.isfinite(value) and value.is_integer()),
          float: isinstance(value, (int, float)) and not isinstance(value, bool),
          str: isinstance(value, str)}[kind]
    if not ok:
        given = "a quoted string" if isinstance(value, str) else "true/false" if isinstance(value, bool) else \
            "null" if value is None else type(value).__name__
        raise UserError(f"config key {name!r} must be {_KINDS[kind]}, got {value!r} ({given})"
                        + (f": write {value} without quotes" if kind in (int, float) and _numeric(value) else ""))
    return kind(value)


def _numeric(value: Any) -> bool:
    try:
        return isinstance(value, str) and math.isfinite(float(value))
    except ValueError:
        return False


def _coerce(name: str, value: Any, *, text: bool = False) -> Any:
    """Convert a value to the key's type, or explain why it cannot be. Command-line values
    (`text`) are strings and are parsed; JSON values must already have the key's type."""
    default = FIELDS[name].default
    if name in PATH_KEYS or default is None:  # paths and data_weights: validate() checks their shapes
        return value
    if name == "eval_tasks" and isinstance(value, str):  # --eval_tasks hellaswag,lambada
        return [t.strip() for t in value.split(",") if t.strip()]
    if name == "max_train_seconds":  # a number of seconds or a duration such as 50m, in JSON too
        return parse_duration(value)
    if not (text and isinstance(value, str)):
        return _strict(name, value)
    try:
        if isinstance(default, bool):
            return parse_bool(value) if isinstance(value, str) else bool(value)
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            if isinstance(value, str):
                value = float(value) if any(c in value for c in ".eE") else int(value)
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError(value)
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, str):
            if not isinstance(value, (str, int, float)):
                raise ValueError(value)
            return str(value)
    except (TypeError, ValueError):
        kind = type(default).__name__
        raise UserError(f"config key {name!r} must be a {kind}, got {value!r}") from None
    return value


def _merge(values: dict, overrides: dict, *, text: bool) -> dict:
    values = dict(values)
    for name, value in canonical_keys(overrides).items():
        if name not in FIELDS:
            hint = nearest_key(name)
            raise UserError(f"unknown config key {name!r}; did you mean {hint!r}? "
                            f"(`python -m gpt2train keys` lists every key)")
        values[name] = _coerce(name, value, text=text)
    return values


def apply_overrides(cfg: Config, overrides: dict, *, text: bool = False) -> Config:
    """`cfg` with keys changed: Python values of each key's type, or command-line strings (`text`)."""
    return Config(**_merge(cfg.to_dict(), overrides, text=text)).validate()


def load_config(path: str, overrides: dict | None = None) -> Config:
    """Read a JSON config (local or fsspec URL), apply overrides, validate."""
    try:
        with fsspec.open(path, "r") as f:
            text = f.read()
    except FileNotFoundError:
        raise UserError(f"config file not found: {path} (the configs/ folder has examples)") from None
    except UnicodeDecodeError as e:
        raise UserError(f"config {path} is not UTF-8 text ({e.reason} at byte {e.start}): write it as JSON") from None
    except OSError as e:
        raise UserError(f"config {path} cannot be read ({e.strerror or e})") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"config {path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise UserError(f"config {path} must hold a JSON object of keys, got {type(raw).__name__}")
    # Keys starting with '_' are comments, as some configs in the wild use them.
    raw = {k: v for k, v in raw.items() if not k.startswith("_")}
    try:
        values = _merge(Config().to_dict(), raw, text=False)  # JSON: each key of its own type
        cfg = Config(**_merge(values, overrides or {}, text=True)).validate()  # the command line's strings
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    return cfg


def describe_keys() -> str:
    """Every config key with its default and meaning, then the aliases."""
    aliases = {name: alias for alias, name in ALIASES.items()}
    lines = []
    for name, f in FIELDS.items():
        origin = "seed" if f.metadata["seed"] else "new "
        also = f" (alias: {aliases[name]})" if name in aliases else ""
        lines.append(f"{name:20s} {origin} default={f.default!r:12}  {f.metadata['doc']}{also}")
    return "\n".join(lines)
