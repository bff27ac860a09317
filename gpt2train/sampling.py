"""How the next token is drawn: the sampling options, declared once, and the sampler itself.

Each option is one field of `SamplingOptions`, with its type, bounds and help. From those fields
come the command-line flags of `generate`, `serve` and main.py (`add_flags`), the fields a
request to the HTTP API may set (`request_fields`), validation (`check`), and the docs
(`describe`): a new option is one field here plus the code that uses it.

The sampler runs inside the compiled decode loop. What it is specialised on (`Filters`: which
filters run, and top-k's k, an array shape) is part of the compiled program; every other setting
reaches it as data (`SamplingValues`), so changing it compiles nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from .config import parse_bool
from .errors import UserError

SEED_LIMIT = 2**32  # JAX keys take 32 bits of a seed (with x64 off, 2**32 is the same key as 0)


def _option(default, help: str, *, low=None, high=None, low_open: bool = False, high_open: bool = False,
            from_config=None):
    """A sampling option: its default, help, bounds (None = unbounded) and, optionally, a default
    taken from the model's config when the user gives none (`from_config(cfg)`)."""
    return field(default=default, metadata={"help": help, "low": low, "high": high, "low_open": low_open,
                                            "high_open": high_open, "from_config": from_config})


@dataclass(frozen=True)
class SamplingOptions:
    length: int = _option(256, "new tokens per sample (default: n_ctx // 2)", low=1,
                          from_config=lambda cfg: cfg.n_ctx // 2)
    temperature: float = _option(1.0, "0 = greedy", low=0.0)
    top_k: int = _option(0, "keep the k most likely tokens (0 = off)", low=0)
    top_p: float = _option(1.0, "nucleus sampling: keep the most likely tokens up to this mass (1 = off)",
                           low=0.0, high=1.0, low_open=True)
    repetition_penalty: float = _option(1.0, ">1 discourages tokens already in the text (1 = off)", low=0.0,
                                        low_open=True)
    seed: int = _option(0, "same seed, same text (default: the config's seed)", low=0, high=SEED_LIMIT,
                        high_open=True, from_config=lambda cfg: cfg.seed)
    stop_at_eot: bool = _option(True, "end a sample at <|endoftext|>")

    def check(self) -> "SamplingOptions":
        """Every value of the right type, finite and within its bounds; else a UserError naming it."""
        for f in fields(self):
            value, meta, kind = getattr(self, f.name), f.metadata, option_type(f)
            if kind is bool:
                if not isinstance(value, bool):
                    raise UserError(f"{f.name} must be true or false, got {value!r}")
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
                raise UserError(f"{f.name} must be {'a number' if kind is float else 'an integer'}, got {value!r}")
            if not math.isfinite(value):
                raise UserError(f"{f.name} must be a finite number, got {value!r}")
            low, high = meta["low"], meta["high"]
            if ((low is not None and (value <= low if meta["low_open"] else value < low))
                    or (high is not None and (value >= high if meta["high_open"] else value > high))):
                raise UserError(f"{f.name} must be {bounds_text(f)}, got {value!r}")
        return self

    @classmethod
    def from_values(cls, values: dict[str, Any], cfg=None) -> "SamplingOptions":
        """Options from flags or a request: a value that is None or missing takes the config's
        default for it (length, seed) or the field's."""
        chosen = {}
        for f in fields(cls):
            value = values.get(f.name)
            if value is None and cfg is not None and f.metadata["from_config"] is not None:
                value = f.metadata["from_config"](cfg)
            if value is not None:
                chosen[f.name] = value
        return cls(**chosen).check()

    def with_seed_offset(self, offset: int) -> "SamplingOptions":
        """The same options with the seed moved by `offset` (each batch of a prompt file gets its own)."""
        return replace(self, seed=(self.seed + offset) % SEED_LIMIT)


def option_type(f) -> type:
    return {"int": int, "float": float, "bool": bool}[f.type] if isinstance(f.type, str) else f.type


def bounds_text(f) -> str:
    """The bounds of an option in words: 'at least 1', '>= 0', '> 0', 'in (0, 1]'."""
    meta = f.metadata
    low, high = (None if v is None else f"{v:g}" if isinstance(v, float) else str(v) for v in (meta["low"], meta["high"]))
    if high is not None and low is not None:
        return f"in {'(' if meta['low_open'] else '['}{low}, {high}{')' if meta['high_open'] else ']'}"
    if low is not None:
        if meta["low_open"]:
            return f"> {low}"
        return f"at least {low}" if option_type(f) is int else f">= {low}"
    return f"{'<' if meta['high_open'] else '<='} {high}" if high is not None else "any value"


def option_fields() -> tuple:
    return fields(SamplingOptions)


def _flag_value(kind: type):
    if kind is not bool:
        return kind

    def true_or_false(text: str) -> bool:  # argparse names the function in its error
        return parse_bool(text)
    true_or_false.__name__ = "true or false"
    return true_or_false


def add_flags(group) -> None:
    """One --flag per option on an argparse group; absent flags are None (see from_values)."""
    for f in option_fields():
        default = f.default if f.metadata["from_config"] is None else None
        shown = f" (default: {default})" if default is not None and "default" not in f.metadata["help"] else ""
        group.add_argument(f"--{f.name}", type=_flag_value(option_type(f)), default=None,
                           help=f.metadata["help"] + shown)


def request_fields() -> dict[str, type]:
    """The options a request to the HTTP API may set, with their Python types."""
    return {f.name: option_type(f) for f in option_fields()}


def describe() -> list[tuple[str, str, Any, str]]:
    """(name, type, default as Markdown, help with bounds) of every option, for the docs."""
    out = []
    for f in option_fields():
        default = f"`{f.default!r}`" if f.metadata["from_config"] is None else "from the config"
        bounds = "" if option_type(f) is bool else f"; {bounds_text(f)}"
        out.append((f.name, option_type(f).__name__, default, f.metadata["help"] + bounds))
    return out


# ----------------------------------------------------------------------------- the sampler
@dataclass(frozen=True)
class Filters:
    """What a compiled sampling program is specialised on: which filters run (top-k's k is an
    array shape, so it stays)."""
    greedy: bool
    top_k: int
    top_p: bool
    penalty: bool
    stop_at_eot: bool

    @classmethod
    def of(cls, opts: SamplingOptions) -> "Filters":
        return cls(opts.temperature == 0, opts.top_k, opts.top_p < 1.0, opts.repetition_penalty != 1.0,
                   opts.stop_at_eot)


class SamplingValues(NamedTuple):
    """The settings a compiled program takes as data (float32 scalars)."""
    temperature: jax.Array
    top_p: jax.Array
    repetition_penalty: jax.Array

    @classmethod
    def of(cls, opts: SamplingOptions) -> "SamplingValues":
        return cls(*(jnp.float32(v) for v in (opts.temperature or 1.0, opts.top_p, opts.repetition_penalty)))


def filter_logits(logits, seen, opts: SamplingOptions):
    """Apply repetition penalty, temperature, top-k and top-p to logits [B, V] (float32)."""
    return _filter(logits, seen, Filters.of(opts), SamplingValues.of(opts))


def _filter(logits, seen, filters: Filters, values: SamplingValues):
    if filters.penalty:
        penalty = values.repetition_penalty
        penalised = jnp.where(logits > 0, logits / penalty, logits * penalty)
        logits = jnp.where(seen, penalised, logits)
    if filters.greedy:
        return logits
    logits = logits / values.temperature
    if filters.top_k > 0:
        kth = jax.lax.top_k(logits, min(filters.top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if filters.top_p:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs       # mass of strictly more likely tokens
        keep = before < values.top_p                       # always keeps the most likely token
        cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def first_argmax(x):
    """jnp.argmax over the last axis (first index of the maximum) as a max and a min: XLA:CPU
    runs argmax's paired value-index reduction 4x slower over a vocabulary-wide row (1.2 ms
    against 0.3 ms for 8 rows of 50k, a few percent of a decoding step)."""
    n = x.shape[-1]
    hits = x == x.max(axis=-1, keepdims=True)
    return jnp.minimum(jnp.min(jnp.where(hits, jnp.arange(n, dtype=jnp.int32), n), axis=-1), n - 1)


def sample_token(logits, seen, key, filters: Filters, values: SamplingValues):
    logits = _filter(logits, seen, filters, values)
    if filters.greedy:
        return first_argmax(logits)
    # jax.random.categorical's own Gumbel-max draw, with the faster argmax: the same tokens.
    return first_argmax(logits + jax.random.gumbel(key, logits.shape, logits.dtype))
