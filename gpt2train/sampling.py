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


# ----------------------------------------------------------------------------- per-row settings
# The server's decode batch mixes requests: every setting is then a row of data, and one
# compiled program serves every mix (no program per top-k, nor per filter switched on).
TOP_CANDIDATES = 64  # rows whose top-k / nucleus lies within the 64 most likely tokens skip a full sort


class RowSettings(NamedTuple):
    """Each row's settings as data, [B] each: temperature (0 = greedy), top_k (0 = off), top_p
    (1 = off), repetition_penalty (1 = off)."""
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    repetition_penalty: jax.Array

    @classmethod
    def of(cls, opts: SamplingOptions) -> "RowSettings":
        """One row's values (numpy-free Python scalars, for the host to place in a batch)."""
        return cls(float(opts.temperature), int(opts.top_k), float(opts.top_p), float(opts.repetition_penalty))


def penalise(logits, seen, penalty):
    """The repetition penalty: logits of tokens already seen move towards 0 by `penalty` (a
    penalty of 1 leaves every logit bitwise as it was)."""
    penalised = jnp.where(logits > 0, logits / penalty, logits * penalty)
    return jnp.where(seen, penalised, logits)


def _row_cutoffs(scaled, top_k, top_p, ranked):
    """Per row, the smallest logit kept by top-k then top-p, given the row's most likely logits
    `ranked` [B, C] in descending order; and whether C was enough to tell (a row whose k exceeds
    C, or whose nucleus reaches the C-th token, needs `_searched_cutoffs`). The kept mass is
    normalised over the whole row, as a full sort would."""
    C = ranked.shape[1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, scaled.shape[-1]), 0)
    kth = jnp.where(k > 0, jnp.take_along_axis(ranked, jnp.clip(k - 1, 0, C - 1)[:, None], axis=-1)[:, 0], -jnp.inf)
    # The row's max taken from `scaled` itself: read from top_k's output, XLA:CPU turned the top_k
    # into a full sort (180 ms against 4 ms for 4 rows of 50k, measured).
    top = jnp.max(scaled, axis=-1, keepdims=True)
    mass = jnp.sum(jnp.where(scaled >= kth[:, None], jnp.exp(scaled - top), 0.0), axis=-1, keepdims=True)
    probs = jnp.where(ranked >= kth[:, None], jnp.exp(ranked - top), 0.0) / mass
    before = jnp.cumsum(probs, axis=-1) - probs                   # mass of strictly more likely tokens
    nucleus = top_p < 1.0
    keep = (before < top_p[:, None]) | ~nucleus[:, None]         # always keeps the most likely token
    p_cut = jnp.min(jnp.where(keep, ranked, jnp.inf), axis=-1)
    cutoff = jnp.where(nucleus, jnp.maximum(p_cut, kth), kth)
    known = (k <= C) & (~nucleus | ~keep[:, -1] | (k > 0))  # k = 0: top-k off
    return cutoff, known


def _ordered(x):
    """float32 -> uint32 keys in the floats' order (finite values), and back (`_unordered`)."""
    u = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where(u >> 31 == 1, ~u, u | jnp.uint32(1 << 31))


def _unordered(key):
    return jax.lax.bitcast_convert_type(jnp.where(key >> 31 == 1, key & jnp.uint32(0x7FFFFFFF), ~key), jnp.float32)


def _searched_cutoffs(scaled, top_k, top_p):
    """The same cutoffs as `_row_cutoffs` over a whole row, found by bisection over the floats'
    order (32 halvings each: exact) instead of a sort, which XLA:CPU ran 7x slower (720 ms for
    16 rows of 50k, measured). k-th largest: the largest t with k values >= t; the nucleus: the
    smallest row value t whose strictly larger values hold less than top_p of the mass."""
    lo0, hi0 = _ordered(jnp.min(scaled, axis=-1)), _ordered(jnp.max(scaled, axis=-1))
    k = jnp.minimum(top_k, scaled.shape[-1])

    def kth_step(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo + 1) // 2
        enough = jnp.sum(scaled >= _unordered(mid)[:, None], axis=-1) >= k
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid - 1)

    kth = _unordered(jax.lax.fori_loop(0, 32, kth_step, (lo0, hi0))[0])
    kth = jnp.where(top_k > 0, kth, -jnp.inf)
    top = jnp.max(scaled, axis=-1, keepdims=True)
    weights = jnp.where(scaled >= kth[:, None], jnp.exp(scaled - top), 0.0)
    probs = weights / jnp.sum(weights, axis=-1, keepdims=True)

    def nucleus_step(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        light = jnp.sum(jnp.where(scaled > _unordered(mid)[:, None], probs, 0.0), axis=-1) < top_p
        return jnp.where(light, lo, mid + 1), jnp.where(light, mid, hi)

    p_cut = _unordered(jax.lax.fori_loop(0, 32, nucleus_step, (lo0, hi0))[0])
    return jnp.where(top_p < 1.0, jnp.maximum(p_cut, kth), kth)


def filter_rows(logits, seen, rows: RowSettings):
    """Repetition penalty, temperature, top-k and top-p with each row's own values: the same
    tokens kept as `_filter` keeps for a row sampled alone (greedy rows are only penalised)."""
    logits = penalise(logits, seen, rows.repetition_penalty[:, None])
    greedy = rows.temperature == 0
    scaled = logits / jnp.where(greedy, 1.0, rows.temperature)[:, None]
    # The common case ranks TOP_CANDIDATES tokens per row (lax.top_k); a row that needs more is
    # searched, which runs only when some row needs it. Each row takes its own path's answer, so
    # its tokens never depend on which other rows share the batch.
    ranked = jax.lax.top_k(scaled, min(TOP_CANDIDATES, scaled.shape[-1]))[0]
    cutoff, known = _row_cutoffs(scaled, rows.top_k, rows.top_p, ranked)
    known = known | greedy
    cutoff = jax.lax.cond(jnp.all(known), lambda: cutoff, lambda: jnp.where(
        known, cutoff, _searched_cutoffs(scaled, rows.top_k, rows.top_p)))
    return jnp.where(greedy[:, None] | (scaled >= cutoff[:, None]), scaled, -jnp.inf)


def sample_rows(logits, seen, keys, rows: RowSettings):
    """One token per row, each with its own settings and key [B] (a row's draw depends on its
    key alone): the Gumbel-max draw of sample_token, row by row."""
    filtered = filter_rows(logits, seen, rows)
    noise = jax.vmap(lambda key: jax.random.gumbel(key, filtered.shape[-1:], filtered.dtype))(keys)
    return first_argmax(jnp.where((rows.temperature == 0)[:, None], filtered, filtered + noise))
