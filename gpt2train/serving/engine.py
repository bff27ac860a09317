"""The server's decode batch: a fixed number of slots, each holding one text, stepped together.

Every per-request setting is data: temperature, top-k, top-p, penalty, seed, length, stopping at
<|endoftext|>. So the programs are fixed by shapes alone: a decode program per context span (how
much of the caches the running texts need), and a prefill per prompt-length bucket, compiled at
warm-up (`warm_up`); no value a client sends compiles anything.

A slot's random draws come from its own key, folded with the number of tokens it has produced,
and its rows of every array are computed by the same programs whatever the other slots hold: a
request's tokens are the same alone or beside others (tests/test_serving.py compares them).
"""

from __future__ import annotations

import functools
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
    logits: jax.Array      # [B, V] the next token's logits
    pos: jax.Array         # [B] tokens in the context (the next token's cache slot)
    seen: jax.Array        # [B, V] tokens in the text (the repetition penalty)
    keys: jax.Array        # [B, 2] the request's key (from its seed)
    produced: jax.Array    # [B] tokens produced so far (folded into the key: the draw's index)
    limit: jax.Array       # [B] tokens to produce
    done: jax.Array        # [B] finished (<|endoftext|> with stop_at_eot, or free)
    stop_at_eot: jax.Array  # [B]
    settings: RowSettings   # [B] each


class Steps(NamedTuple):
    """What `n` decode steps produced, [B, chunk] each (only the first n columns are real)."""
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
        self.params = model.decode_params(params)
        self.buckets = prompt_buckets(cfg.n_ctx)
        B, V = slots, cfg.padded_vocab
        self.state = SlotState(
            cache=model.init_cache(cfg, B, cfg.n_ctx), logits=jnp.zeros((B, V), jnp.float32),
            pos=jnp.zeros((B,), jnp.int32), seen=jnp.zeros((B, V), bool),
            keys=jnp.zeros((B, 2), jnp.uint32), produced=jnp.zeros((B,), jnp.int32),
            limit=jnp.zeros((B,), jnp.int32), done=jnp.ones((B,), bool), stop_at_eot=jnp.ones((B,), bool),
            settings=RowSettings(jnp.zeros((B,), jnp.float32), jnp.zeros((B,), jnp.int32),
                                 jnp.ones((B,), jnp.float32), jnp.ones((B,), jnp.float32)))
        self.spans = context_spans(cfg.n_ctx)
        self._pos = np.zeros((slots,), np.int64)  # each slot's text length, on the host
        self._busy: set[int] = set()
        self._decode = jax.jit(self._decode_fn, donate_argnums=(1,), static_argnames=("span",))
        self._admit = jax.jit(self._admit_fn, donate_argnums=(1,), static_argnames=("prompt_logprobs",))

    # -------------------------------------------------------------- compiled pieces
    def _decode_fn(self, params, state: SlotState, n, *, span: int):
        """`n` (traced, at most `chunk`) steps of every slot: sample, then run the token; the
        busy slots' texts lie within the caches' first `span` slots."""
        cfg, eot = self.cfg, self.eot
        B = state.pos.shape[0]

        def one(i, carry):
            s, out = carry
            live = ~s.done & (s.produced < s.limit)
            keys = jax.vmap(jax.random.fold_in)(s.keys, s.produced)
            tok = sample_rows(s.logits, s.seen, keys, s.settings)
            logz = jax.nn.logsumexp(s.logits, axis=-1, keepdims=True)
            logprobs = s.logits - logz
            chosen = jnp.take_along_axis(logprobs, tok[:, None], axis=-1)[:, 0]
            top_lp, top_tok = jax.lax.top_k(logprobs, TOP_LOGPROBS)
            done = s.done | ~live | (s.stop_at_eot & (tok == eot))
            seen = s.seen.at[jnp.arange(B), tok].set(True)
            logits, cache = model.forward_cached(params, tok[:, None], s.cache, s.pos, jnp.zeros((B,), jnp.int32), cfg,
                                                 span=span)
            step = live.astype(jnp.int32)
            emitted = live & ~(s.stop_at_eot & (tok == eot))  # <|endoftext|> ends a text, it is not part of it
            s = s._replace(cache=cache, logits=jnp.where(live[:, None], logits[:, -1], s.logits),
                           pos=jnp.minimum(s.pos + step, cfg.n_ctx - 1), seen=jnp.where(live[:, None], seen, s.seen),
                           produced=s.produced + step, done=done)
            toks, lps, lives, top_toks, top_lps = out
            out = (toks.at[:, i].set(tok), lps.at[:, i].set(chosen), lives.at[:, i].set(emitted),
                   top_toks.at[:, i].set(top_tok), top_lps.at[:, i].set(top_lp))
            return s, out

        out = (jnp.zeros((B, self.chunk), jnp.int32), jnp.zeros((B, self.chunk), jnp.float32),
               jnp.zeros((B, self.chunk), bool), jnp.zeros((B, self.chunk, TOP_LOGPROBS), jnp.int32),
               jnp.zeros((B, self.chunk, TOP_LOGPROBS), jnp.float32))
        return jax.lax.fori_loop(0, n, one, (state, out))

    def _admit_fn(self, params, state: SlotState, slot, tokens, length, row, *, prompt_logprobs: bool):
        """Run a right-padded prompt [1, P] through the model and place it in `slot`; `row`
        holds the slot's settings. With prompt_logprobs, also each prompt token's logprob."""
        cfg, H = self.cfg, self.cfg.n_head
        P = tokens.shape[1]
        small = model.init_cache(cfg, 1, P)
        zero = jnp.zeros((1,), jnp.int32)
        if prompt_logprobs:
            all_logits, small = model.forward_cached(params, tokens, small, 0, zero, cfg)
            lp = jax.nn.log_softmax(all_logits[0], axis=-1)
            prompt_lp = jnp.take_along_axis(lp[:-1], tokens[0, 1:, None], axis=-1)[:, 0]
            logits = jnp.take_along_axis(all_logits, (length - 1)[None, None, None], axis=1)[:, 0]
        else:
            logits, small = model.forward_cached(params, tokens, small, 0, zero, cfg, at=(length - 1)[None])
            logits, prompt_lp = logits[:, 0], jnp.zeros((P - 1,), jnp.float32)
        put = lambda big, new: jax.lax.dynamic_update_slice(big, new, (slot * H, 0, 0))  # noqa: E731
        cache = {name: [put(b, s) for b, s in zip(state.cache[name], small[name])] for name in ("k", "v")}
        in_prompt = jnp.arange(P) < length
        seen = jnp.zeros((cfg.padded_vocab,), bool).at[jnp.where(in_prompt, tokens[0], cfg.padded_vocab)].set(True, mode="drop")
        temperature, top_k, top_p, penalty, seed, limit, stop_at_eot = row
        settings = RowSettings(*(a.at[slot].set(v) for a, v in zip(
            state.settings, (temperature, top_k.astype(jnp.int32), top_p, penalty))))
        state = state._replace(
            cache=cache, logits=state.logits.at[slot].set(logits[0]), pos=state.pos.at[slot].set(length),
            seen=state.seen.at[slot].set(seen), keys=state.keys.at[slot].set(jax.random.PRNGKey(seed.astype(jnp.uint32))),
            produced=state.produced.at[slot].set(0), limit=state.limit.at[slot].set(limit.astype(jnp.int32)),
            done=state.done.at[slot].set(False), stop_at_eot=state.stop_at_eot.at[slot].set(stop_at_eot > 0),
            settings=settings)
        return state, prompt_lp

    # -------------------------------------------------------------- host side
    def bucket(self, length: int) -> int:
        return next(b for b in self.buckets if b >= length)

    def admit(self, slot: int, a: Admission) -> np.ndarray | None:
        """Prefill a's prompt into `slot`; returns its prompt tokens' logprobs if asked."""
        ids = a.tokens
        P = self.bucket(len(ids))
        tokens = np.zeros((1, P), np.int32)
        tokens[0, :len(ids)] = ids
        o = a.opts
        row = (np.float32(o.temperature), np.float32(o.top_k), np.float32(o.top_p), np.float32(o.repetition_penalty),
               np.uint32(o.seed), np.float32(a.limit), np.float32(o.stop_at_eot))
        self.state, prompt_lp = self._admit(self.params, self.state, np.int32(slot), tokens, np.int32(len(ids)),
                                            row, prompt_logprobs=a.prompt_logprobs)
        self._pos[slot] = len(ids)
        self._busy.add(slot)
        return np.asarray(prompt_lp)[:len(ids) - 1] if a.prompt_logprobs else None

    def free(self, slot: int) -> None:
        """Stop a slot (its request finished or was cancelled): it no longer produces tokens."""
        self.state = self.state._replace(done=self.state.done.at[slot].set(True))
        self._busy.discard(slot)

    def span_for(self, n: int) -> int:
        """The smallest span holding every busy slot's text after n more tokens."""
        need = max((int(self._pos[s]) for s in self._busy), default=0) + n
        return next((s for s in self.spans if s >= need), self.spans[-1])

    def step(self, n: int | None = None) -> Steps:
        """Run n (default: chunk) decode steps of every slot and bring their results to the host."""
        n = self.chunk if n is None else min(n, self.chunk)
        self.state, out = self._decode(self.params, self.state, np.int32(n), span=self.span_for(n))
        toks, lps, live, top_toks, top_lps, self._pos[:] = jax.device_get(out + (self.state.pos,))
        return Steps(toks[:, :n], lps[:, :n], live[:, :n], top_toks[:, :n], top_lps[:, :n])

    def warm_up(self, prompt_logprobs: bool = False) -> None:
        """Compile every program the server runs (decode and each prefill bucket) before serving."""
        opts = SamplingOptions(length=1)
        for P in self.buckets:
            self.admit(0, Admission([0] * P, opts, 1, prompt_logprobs=False))
            if prompt_logprobs:
                self.admit(0, Admission([0] * P, opts, 1, prompt_logprobs=True))
        for span in self.spans:
            self.state, _ = self._decode(self.params, self.state, np.int32(1), span=span)
        self.free(0)

    def compiled_programs(self) -> int:
        """How many programs have been compiled so far (constant after warm-up)."""
        return self._decode._cache_size() + self._admit._cache_size()
