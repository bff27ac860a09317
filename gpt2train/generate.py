"""Batched sampling with a preallocated KV cache: temperature, top-k, top-p, repetition penalty, seed.

A prompt batch is left-padded to a bucketed length and run through the model once (prefill);
then tokens are produced by a compiled loop of `chunk` decode steps per call, so text can be
streamed between chunks and generation stops as soon as every row has emitted <|endoftext|>.
At the end of the context it slides on from the last half of the text. The same seed and
settings give the same text.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import fsspec
import jax
import jax.numpy as jnp
import numpy as np

from . import model
from .config import Config
from .sampling import Filters, SamplingOptions, SamplingValues, sample_token

PROMPT_BUCKET = 32  # prompt lengths are rounded up to a multiple of this to reuse compiled programs


class Generator:
    """Holds parameters and compiled programs; `generate` turns prompts into continuations."""

    def __init__(self, cfg: Config, params, tokenizer, *, chunk: int = 32):
        self.cfg, self.tok, self.chunk = cfg, tokenizer, chunk
        self._params = model.decode_params(params)
        self._prefill = jax.jit(functools.partial(self._prefill_fn, cfg=cfg))
        self._decode = jax.jit(self._decode_fn, static_argnames=("filters",), donate_argnums=(1,))

    def use_params(self, params) -> None:
        """Swap in parameters of the same shapes (a model still training): the compiled programs
        stay, since they take the parameters as arguments."""
        self._params = model.decode_params(params)

    def params_for(self, batch: int):
        """Decode parameters for a batch size, in the kernel layout kernels.decode_transposed picks
        for it. One layout is held at a time, converted in place when the batch size asks for
        the other, so memory stays at one copy of the weights."""
        self._params = model.laid_out_for(self._params, batch)
        return self._params

    # -------------------------------------------------------------- compiled pieces
    @staticmethod
    def _prefill_fn(params, tokens, pad, cache, *, cfg):
        logits, cache = model.forward_cached(params, tokens, cache, 0, pad, cfg, last_only=True)
        return logits[:, -1], cache

    def _decode_fn(self, params, carry, key, values, n, filters: Filters):
        """`n` (traced, at most `chunk`) decode steps in one program; carry = (cache, logits, index,
        seen, done, pad). The count is traced so that one compiled program also runs the last,
        shorter call: no step is computed past the requested length, and nothing recompiles."""
        cfg, eot = self.cfg, self.tok.eot_id

        def one(i, state):
            (cache, logits, index, seen, done, pad), toks = state
            tok = sample_token(logits, seen, jax.random.fold_in(key, index), filters, values)
            tok = jnp.where(done, eot, tok)
            if filters.stop_at_eot:
                done = done | (tok == eot)
            if filters.penalty:  # only the penalty reads it
                seen = seen.at[jnp.arange(tok.shape[0]), tok].set(True)
            logits, cache = model.forward_cached(params, tok[:, None], cache, index, pad, cfg)
            return (cache, logits[:, -1], index + 1, seen, done, pad), toks.at[:, i].set(tok)

        toks = jnp.zeros((carry[1].shape[0], self.chunk), jnp.int32)
        return jax.lax.fori_loop(0, n, one, (carry, toks))

    # -------------------------------------------------------------- host side
    def encode_prompts(self, prompts: list[str]) -> list[list[int]]:
        """Tokenize prompts; one longer than the context keeps its last n_ctx - 1 tokens (warned)."""
        n_ctx = self.cfg.n_ctx
        out = []
        for p in prompts:
            ids = self.tok.encode(p) if p else []
            ids = ids or [self.tok.eot_id]  # no prompt: start from a document boundary
            if len(ids) > n_ctx - 1:
                warnings.warn(f"prompt of {len(ids)} tokens is longer than the {n_ctx}-token context; "
                              f"keeping its last {n_ctx - 1} tokens")
                ids = ids[-(n_ctx - 1):]
            out.append(ids)
        return out

    def _segment(self, contexts: list[list[int]], history: list[list[int]], done: list[bool], length: int,
                 opts: SamplingOptions, key):
        """Prefill `contexts` (left-padded into one batch) and decode `length` tokens after them,
        yielding each call's tokens [B, n]. `history` (every token so far) feeds the repetition
        penalty; rows already `done` only pad."""
        B = len(contexts)
        longest = max(len(ids) for ids in contexts)
        P = max(min(-(-longest // PROMPT_BUCKET) * PROMPT_BUCKET, self.cfg.n_ctx - length), longest)
        calls = -(-length // self.chunk)
        # The cache (a compiled shape) holds whole chunks: lengths within one chunk share programs.
        total = min(P + calls * self.chunk, self.cfg.n_ctx)
        tokens = np.zeros((B, P), np.int32)
        pad = np.zeros((B,), np.int32)
        seen = np.zeros((B, self.cfg.padded_vocab), bool)
        for i, ids in enumerate(contexts):
            tokens[i, P - len(ids):] = ids
            pad[i] = P - len(ids)
            seen[i, history[i]] = True
        params = self.params_for(B)
        logits, cache = self._prefill(params, jnp.asarray(tokens), jnp.asarray(pad), model.init_cache(self.cfg, B, total))
        carry = (cache, logits, jnp.int32(P), jnp.asarray(seen), jnp.asarray(done), jnp.asarray(pad))
        filters, values = Filters.of(opts), SamplingValues.of(opts)
        for call in range(calls):
            n = min(self.chunk, length - call * self.chunk)
            carry, toks = self._decode(params, carry, key, values, jnp.int32(n), filters=filters)
            yield np.asarray(toks)[:, :n]

    def generate(self, prompts: list[str], opts: SamplingOptions, on_text=None, *, return_tokens=False):
        """Continue each prompt; `on_text(row, new_text)` is called as text arrives (streaming).

        Past the end of the context, generation slides on: the last n_ctx // 2 tokens of each row
        are run through the model again and decoding goes on from them (the model then sees only
        that much of the text). Returns the continuations' texts (or their token ids with
        return_tokens=True).
        """
        opts.check()
        encoded = self.encode_prompts(prompts)
        B, length, eot = len(encoded), opts.length, self.tok.eot_id
        history = [list(ids) for ids in encoded]  # prompt + produced, per row
        produced = [[] for _ in range(B)]
        emitted = [""] * B
        finished = [False] * B

        def active() -> bool:
            return not all(finished[i] or len(produced[i]) >= length for i in range(B))

        segment = steps = 0
        while active():
            # The first segment uses the seed's key itself: text within the context does not
            # depend on whether it could have slid.
            key = jax.random.PRNGKey(opts.seed)
            if segment:
                key = jax.random.fold_in(key, segment)
            contexts = history if segment == 0 else [h[-(self.cfg.n_ctx // 2):] for h in history]
            room = self.cfg.n_ctx - max(len(c) for c in contexts)
            todo = min(room, length - steps)
            for toks in self._segment(contexts, history, list(finished), todo, opts, key):
                steps += toks.shape[1]
                for i in range(B):
                    for t in toks[i]:
                        if finished[i] or len(produced[i]) >= length:
                            break
                        if opts.stop_at_eot and t == eot:
                            finished[i] = True
                            break
                        produced[i].append(int(t))
                        history[i].append(int(t))
                    if on_text is not None:
                        text = self.tok.decode(produced[i])
                        stable = text.rstrip("\ufffd") if not finished[i] else text  # hold back split characters
                        if len(stable) > len(emitted[i]):
                            on_text(i, stable[len(emitted[i]):])
                            emitted[i] = stable
                if not active():
                    break
            segment += 1
        if return_tokens:
            return produced
        texts = [self.tok.decode(ids) for ids in produced]
        if on_text is not None:
            for i, text in enumerate(texts):
                if len(text) > len(emitted[i]):
                    on_text(i, text[len(emitted[i]):])
        return texts


@dataclass
class Batch:
    """One batch of samples: its rows' texts and the warnings generating them gave."""
    first: int  # index of its first row among all the rows asked for
    texts: list[str]
    warnings: list[str]


def generate_batches(gen: Generator, prompts: Sequence[str], opts: SamplingOptions, batch_size: int, *,
                     samples: int = 1, on_text: Callable[[int, str], None] | None = None) -> Iterator[Batch]:
    """Each prompt `samples` times, in batches of `batch_size` rows; each batch's seed is the
    options' seed moved by its first row, so the samples of one prompt differ and every one is
    reproducible. on_text(row, new_text) streams, with rows counted across batches."""
    rows = [p for p in prompts for _ in range(samples)]
    for first in range(0, len(rows), max(1, batch_size)):
        stream = None if on_text is None else (lambda i, text, first=first: on_text(first + i, text))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            texts = gen.generate(rows[first:first + batch_size], opts.with_seed_offset(first), on_text=stream)
        yield Batch(first, texts, [str(w.message) for w in caught])


def banner(i: int) -> str:
    return "=" * 40 + " SAMPLE " + str(i) + " " + "=" * 40


def format_sample(i: int, text: str) -> str:
    """The seed's prediction format: a SAMPLE banner, the text, a closing rule."""
    return f"{banner(i)}\n{text}\n{'=' * 80}\n"


def append_samples(path: str, samples: list[str], first_index: int = 0) -> None:
    fs, p = fsspec.core.url_to_fs(path)
    parent = p.rsplit("/", 1)[0] if "/" in p else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fsspec.open(path, "a", encoding="utf-8") as f:
        for j, text in enumerate(samples):
            f.write(format_sample(first_index + j, text))
