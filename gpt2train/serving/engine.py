"""The server's decode batch: a fixed number of slots, each holding one text, stepped together.

Every per-request setting is data: temperature, top-k, top-p, penalty, seed, length, stopping at
<|endoftext|>. So the programs are fixed by shapes alone: a decode program per context span (how
much of the caches the running texts need), and a prefill per prompt-length bucket, compiled at
warm-up (`warm_up`); no value a client sends compiles anything.

A slot's random draws come from its own key, folded with the number of tokens it has produced,
and its rows of every array are computed by the same programs whatever the other slots hold: a
request's tokens are the same alone or beside others (tests/test_serving.py compares them). A
bucket's prefill has a fixed number of rows (`prefill_rows`) for the same reason: a prompt goes
through the same program, whether it is admitted alone (beside dummy rows) or with others.

The prefill also draws each prompt's first token, so it reaches its client without waiting for a
decode step; a decode step then runs the token drawn last and draws the next one.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .. import model
from ..config import Config
from ..sampling import RowSettings, SamplingOptions, sample_rows

TOP_LOGPROBS = 5  # the most likely alternatives reported per token (OpenAI's limit for logprobs)
SMALLEST_BUCKET = 16
# Prompts of up to BATCHED_BUCKET tokens are prefilled PREFILL_ROWS per call. A short prompt's
# call is mostly fixed cost (the weights streamed once): at 124M on 2 cores (AVX2) a 32-token
# bucket took 0.18 s with 1 row, 0.36 s with 4, 0.66 s with 8; a 64-token one with 2 rows took as
# long as 2 calls (measured). Rows are fixed per bucket, so a lone prompt pays for all of them.
PREFILL_ROWS = 4
BATCHED_BUCKET = 32
# The length a decode call aims at: a request arriving meanwhile waits about this long before
# it is admitted (`Engine.steps_per_call`).
CALL_SECONDS = 0.1


SMALLEST_SPAN = 128


def context_spans(n_ctx: int) -> list[int]:
    """How much of the caches a decode program reads: powers of two from 128, and the context.
    A batch of short texts reads the first 128 slots, not all n_ctx of them (at 124M with 16
    slots a step over 1024 slots took 1.9x as long as one over 128, measured)."""
    sizes, size = [], SMALLEST_SPAN
    while size < n_ctx:
        sizes.append(size)
        size *= 2
    return sizes + [n_ctx]


def prompt_buckets(n_ctx: int) -> list[int]:
    """Prompt lengths a prefill is compiled for: powers of two from 16, and the context itself
    (a handful of programs; a prompt pads to the next one, at most doubling its prefill)."""
    sizes, size = [], SMALLEST_BUCKET
    while size < n_ctx:
        sizes.append(size)
        size *= 2
    return sizes + [n_ctx]


class SlotState(NamedTuple):
    """Everything the decode program carries, one row per slot."""
    cache: dict
    token: jax.Array       # [B] the token drawn last, not yet run through the model
    pos: jax.Array         # [B] tokens in the context (the drawn token's cache slot)
    seen: jax.Array        # [B, V] tokens in the text (the repetition penalty)
    keys: jax.Array        # [B, 2] the request's key (from its seed)
    produced: jax.Array    # [B] tokens produced so far (folded into the key: the draw's index)
    limit: jax.Array       # [B] tokens to produce
    done: jax.Array        # [B] finished (<|endoftext|> with stop_at_eot, or free)
    stop_at_eot: jax.Array  # [B]
    settings: RowSettings   # [B] each


class Steps(NamedTuple):
    """Tokens drawn, [rows, columns] each: by `n` decode steps (a row per slot, n columns) or by
    a prefill (a row per prompt, one column)."""
    tokens: np.ndarray
    logprobs: np.ndarray
    live: np.ndarray        # whether the slot produced this token (not finished before it)
    top_tokens: np.ndarray  # [B, chunk, TOP_LOGPROBS]
    top_logprobs: np.ndarray


@dataclass
class Admission:
    """A prompt to place in a slot, with its settings."""
    tokens: list[int]
    opts: SamplingOptions
    limit: int
    prompt_logprobs: bool = False


class Engine:
    """The slots' state on the device and the compiled programs that step and fill it."""

    def __init__(self, cfg: Config, params, eot_id: int, *, slots: int, chunk: int = 4):
        self.cfg, self.eot, self.slots, self.chunk = cfg, eot_id, slots, chunk
        self.params = model.laid_out_for(model.decode_params(params), slots)
        self.buckets = prompt_buckets(cfg.n_ctx)
        B, V = slots, cfg.padded_vocab
        self.state = SlotState(
            cache=model.init_cache(cfg, B, cfg.n_ctx), token=jnp.zeros((B,), jnp.int32),
            pos=jnp.zeros((B,), jnp.int32), seen=jnp.zeros((B, V), bool),
            keys=jnp.zeros((B, 2), jnp.uint32), produced=jnp.zeros((B,), jnp.int32),
            limit=jnp.zeros((B,), jnp.int32), done=jnp.ones((B,), bool), stop_at_eot=jnp.ones((B,), bool),
            settings=RowSettings(jnp.zeros((B,), jnp.float32), jnp.zeros((B,), jnp.int32),
                                 jnp.ones((B,), jnp.float32), jnp.ones((B,), jnp.float32)))
        self.spans = context_spans(cfg.n_ctx)
        self._pos = np.zeros((slots,), np.int64)  # each slot's text length, on the host
        self._busy: set[int] = set()
        self._step_seconds: float | None = None  # one decode step's time, measured on the last call
        self._decode = jax.jit(self._decode_fn, donate_argnums=(1,), static_argnames=("span",))
        self._admit = jax.jit(self._admit_fn, donate_argnums=(1,), static_argnames=("prompt_logprobs",))

    # -------------------------------------------------------------- compiled pieces
    def _draw(self, logits, seen, keys, produced, settings, stop_at_eot, live):
        """Each row's next token from its logits, drawn with its key folded with the draw's index
        (`produced`); returns the updated state pieces (token, seen, done) and the row's output
        (token, its logprob, whether it is part of the text, the most likely alternatives)."""
        tok = sample_rows(logits, seen, jax.vmap(jax.random.fold_in)(keys, produced), settings)
        logprobs = logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True)
        chosen = jnp.take_along_axis(logprobs, tok[:, None], axis=-1)[:, 0]
        top_lp, top_tok = jax.lax.top_k(logprobs, TOP_LOGPROBS)
        ends = stop_at_eot & (tok == self.eot)  # <|endoftext|> ends a text, it is not part of it
        seen = jnp.where(live[:, None], seen.at[jnp.arange(tok.shape[0]), tok].set(True), seen)
        return (tok, seen, ~live | ends), (tok, chosen, live & ~ends, top_tok, top_lp)

    def _decode_fn(self, params, state: SlotState, n, *, span: int):
        """`n` (traced, at most `chunk`) steps of every slot: run the token drawn last, then draw
        the next; the busy slots' texts lie within the caches' first `span` slots."""
        cfg = self.cfg
        B = state.pos.shape[0]

        def one(i, carry):
            s, out = carry
            live = ~s.done & (s.produced < s.limit)
            logits, cache = model.forward_cached(params, s.token[:, None], s.cache, s.pos, jnp.zeros((B,), jnp.int32),
                                                 cfg, span=span)
            (tok, seen, ends), drawn = self._draw(logits[:, -1], s.seen, s.keys, s.produced, s.settings,
                                                  s.stop_at_eot, live)
            step = live.astype(jnp.int32)
            s = s._replace(cache=cache, token=jnp.where(live, tok, s.token), pos=jnp.minimum(s.pos + step, cfg.n_ctx - 1),
                           seen=seen, produced=s.produced + step, done=s.done | ends)
            out = tuple(o.at[:, i].set(d) for o, d in zip(out, drawn))
            return s, out

        out = (jnp.zeros((B, self.chunk), jnp.int32), jnp.zeros((B, self.chunk), jnp.float32),
               jnp.zeros((B, self.chunk), bool), jnp.zeros((B, self.chunk, TOP_LOGPROBS), jnp.int32),
               jnp.zeros((B, self.chunk, TOP_LOGPROBS), jnp.float32))
        return jax.lax.fori_loop(0, n, one, (state, out))

    def _admit_fn(self, params, state: SlotState, slots, tokens, lengths, rows, *, prompt_logprobs: bool):
        """Run right-padded prompts [R, P] through the model and place row r in slot slots[r];
        `rows` holds each row's settings. A row whose slot is `self.slots` (out of range) is a
        dummy: its writes are dropped. Returns the state, each row's first token drawn (Steps'
        fields, one column) and, with prompt_logprobs, each prompt token's logprob."""
        cfg, H = self.cfg, self.cfg.n_head
        R, P = tokens.shape
        small = model.init_cache(cfg, R, P)
        zero = jnp.zeros((R,), jnp.int32)
        if prompt_logprobs:
            all_logits, small = model.forward_cached(params, tokens, small, 0, zero, cfg)
            lp = jax.nn.log_softmax(all_logits[:, :-1], axis=-1)
            prompt_lp = jnp.take_along_axis(lp, tokens[:, 1:, None], axis=-1)[..., 0]
            logits = jnp.take_along_axis(all_logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
        else:
            logits, small = model.forward_cached(params, tokens, small, 0, zero, cfg, at=lengths - 1)
            logits, prompt_lp = logits[:, 0], jnp.zeros((R, P - 1), jnp.float32)
        # Caches are [slots * H, S, Dh]: row r's heads go to rows slots[r] * H + h (a dummy's past the end).
        cache_rows = (slots[:, None] * H + jnp.arange(H)[None, :]).reshape(-1)
        put = lambda big, new: big.at[cache_rows, :P].set(new, mode="drop")  # noqa: E731
        cache = {name: [put(b, s) for b, s in zip(state.cache[name], small[name])] for name in ("k", "v")}
        in_prompt = jnp.arange(P)[None, :] < lengths[:, None]
        seen = jnp.zeros((R, cfg.padded_vocab), bool).at[
            jnp.arange(R)[:, None], jnp.where(in_prompt, tokens, cfg.padded_vocab)].set(True, mode="drop")
        temperature, top_k, top_p, penalty, seed, limit, stop_at_eot = rows
        settings = RowSettings(temperature, top_k.astype(jnp.int32), top_p, penalty)
        keys = jax.vmap(jax.random.PRNGKey)(seed)
        (tok, seen, done), drawn = self._draw(logits, seen, keys, zero, settings, stop_at_eot > 0, limit > 0)
        set_ = lambda a, v: a.at[slots].set(v.astype(a.dtype), mode="drop")  # noqa: E731
        state = state._replace(
            cache=cache, token=set_(state.token, tok), pos=set_(state.pos, lengths), seen=set_(state.seen, seen),
            keys=set_(state.keys, keys), produced=set_(state.produced, jnp.ones((R,), jnp.int32)),
            limit=set_(state.limit, limit), done=set_(state.done, done),
            stop_at_eot=set_(state.stop_at_eot, stop_at_eot > 0),
            settings=RowSettings(*(set_(a, v) for a, v in zip(state.settings, settings))))
        return state, tuple(d[:, None] for d in drawn), prompt_lp

    # -------------------------------------------------------------- host side
    def bucket(self, length: int) -> int:
        return next(b for b in self.buckets if b >= length)

    def prefill_rows(self, bucket: int) -> int:
        """How many prompts of this bucket one prefill call takes (its program's fixed row count)."""
        return min(self.slots, PREFILL_ROWS) if bucket <= BATCHED_BUCKET else 1

    def admit(self, slots: list[int], batch: list[Admission]) -> tuple[Steps, list[np.ndarray | None]]:
        """Prefill the prompts of `batch` into `slots`, in one call: they share a bucket and
        prompt_logprobs, and are at most prefill_rows(bucket). Returns their first tokens (row i:
        batch[i]'s) and each one's prompt tokens' logprobs if asked (else None)."""
        P = self.bucket(len(batch[0].tokens))
        R, echo = self.prefill_rows(P), batch[0].prompt_logprobs
        assert 0 < len(batch) <= R and all(self.bucket(len(a.tokens)) == P and a.prompt_logprobs == echo
                                           for a in batch), "one prefill call takes one bucket's prompts"
        # Unused rows are dummies: one token 0 each, drawn greedily, placed in slot `self.slots`,
        # i.e. nowhere.
        tokens, lengths = np.zeros((R, P), np.int32), np.ones((R,), np.int32)
        where = np.full((R,), self.slots, np.int32)
        rows = tuple(np.full((R,), neutral, np.uint32 if name == "seed" else np.float32) for name, neutral in
                     (("temperature", 0), ("top_k", 0), ("top_p", 1), ("penalty", 1), ("seed", 0), ("limit", 1),
                      ("stop_at_eot", 0)))
        for r, (slot, a) in enumerate(zip(slots, batch)):
            tokens[r, :len(a.tokens)], lengths[r], where[r] = a.tokens, len(a.tokens), slot
            o = a.opts
            for column, value in zip(rows, (o.temperature, o.top_k, o.top_p, o.repetition_penalty, o.seed, a.limit,
                                            o.stop_at_eot)):
                column[r] = value
        self.state, drawn, prompt_lp = self._admit(self.params, self.state, where, tokens, lengths, rows,
                                                   prompt_logprobs=echo)
        for slot, a in zip(slots, batch):
            self._pos[slot] = len(a.tokens)
            self._busy.add(slot)
        drawn, prompt_lp = jax.device_get((drawn, prompt_lp))
        first = Steps(*(d[:len(batch)] for d in drawn))
        return first, [prompt_lp[r, :len(a.tokens) - 1] if echo else None for r, a in enumerate(batch)]

    def free(self, slot: int) -> None:
        """Stop a slot (its request finished or was cancelled): it no longer produces tokens."""
        self.state = self.state._replace(done=self.state.done.at[slot].set(True))
        self._busy.discard(slot)

    def span_for(self, n: int) -> int:
        """The smallest span holding every busy slot's text after n more tokens run."""
        need = max((int(self._pos[s]) for s in self._busy), default=0) + n
        return next((s for s in self.spans if s >= need), self.spans[-1])

    def steps_per_call(self) -> int:
        """Decode steps in a call that lasts about CALL_SECONDS, from the last call's step time,
        from 1 to chunk (1 until a step has been timed): at 124M with 16 slots on 2 cores a step
        takes ~0.17 s, so 1; a tiny model's take ms, so chunk. How many steps a call runs
        changes no number (n is data to the program)."""
        if self._step_seconds is None:
            return 1
        return max(1, min(self.chunk, int(CALL_SECONDS / self._step_seconds)))

    def step(self, n: int | None = None) -> Steps:
        """Run n (default: steps_per_call) decode steps of every slot and bring their results to the host."""
        n = self.steps_per_call() if n is None else min(n, self.chunk)
        start = time.perf_counter()
        self.state, out = self._decode(self.params, self.state, np.int32(n), span=self.span_for(n))
        toks, lps, live, top_toks, top_lps, self._pos[:] = jax.device_get(out + (self.state.pos,))
        self._step_seconds = (time.perf_counter() - start) / n
        return Steps(toks[:, :n], lps[:, :n], live[:, :n], top_toks[:, :n], top_lps[:, :n])

    def warm_up(self, prompt_logprobs: bool = False) -> None:
        """Compile every program the server runs (decode and each prefill bucket) before serving."""
        opts = SamplingOptions(length=1)
        for P in self.buckets:
            self.admit([0], [Admission([0] * P, opts, 1, prompt_logprobs=False)])
            if prompt_logprobs:
                self.admit([0], [Admission([0] * P, opts, 1, prompt_logprobs=True)])
        for span in self.spans:
            self.state, _ = self._decode(self.params, self.state, np.int32(1), span=span)
        self.free(0)

    def compiled_programs(self) -> int:
        """How many programs have been compiled so far (constant after warm-up)."""
        return self._decode._cache_size() + self._admit._cache_size()
