"""Held-out loss, perplexity and bits per byte of a trained model on text files.

Documents are joined by <|endoftext|> into one stream and scored in consecutive windows of
n_ctx tokens (every token after the first is predicted exactly once, with the context its
window gives it). perplexity = exp(mean token loss); bits per byte = total loss in bits
divided by the UTF-8 bytes of the scored tokens, which makes models with different
vocabularies comparable.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from . import model
from .config import Config
from .errors import UserError
from .paths import expand_paths
from .text_sources import token_documents


def token_stream(spec, tokenizer) -> tuple[np.ndarray, int]:
    """All documents' tokens, each followed by <|endoftext|>, and the number of documents."""
    docs = token_documents(expand_paths(spec), tokenizer)
    if not docs:
        raise UserError(f"the evaluation text {spec!r} is empty: give files with some text in them")
    stream = np.concatenate([np.append(d, tokenizer.eot_id) for d in docs]).astype(np.int32)
    return stream, len(docs)


def windows(stream: np.ndarray, n_ctx: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut the stream into [N, n_ctx+1] windows overlapping by one token; the ragged tail is
    padded and masked. Returns (windows, target mask [N, n_ctx])."""
    n_targets = len(stream) - 1
    if n_targets < 1:
        raise UserError("the evaluation text is empty: give files with some text in them")
    n = -(-n_targets // n_ctx)
    padded = np.zeros(n * n_ctx + 1, np.int32)
    padded[: len(stream)] = stream
    idx = np.arange(n)[:, None] * n_ctx + np.arange(n_ctx + 1)[None, :]
    mask = (np.arange(n * n_ctx) < n_targets).reshape(n, n_ctx)
    return padded[idx], mask


def sliding_windows(stream: np.ndarray, n_ctx: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Windows the way HF documents GPT-2 perplexity: each sees up to n_ctx tokens starting
    `stride` after the previous one, and scores only targets the previous windows did not
    (inside a window the first token is context only). Returns (windows, target mask)."""
    if not 1 <= stride <= n_ctx:
        raise UserError(f"--stride {stride} must be between 1 and n_ctx ({n_ctx})")
    n = len(stream)
    if n < 2:
        raise UserError("the evaluation text is empty: give files with some text in them")
    starts, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + n_ctx, n)
        starts.append((begin, prev_end, end))
        prev_end = end
        if end == n:
            break
    padded = np.zeros(starts[-1][0] + n_ctx + 1, np.int32)
    padded[:n] = stream
    wins = np.stack([padded[b : b + n_ctx + 1] for b, _, _ in starts])
    positions = np.array([b for b, _, _ in starts])[:, None] + np.arange(1, n_ctx + 1)[None, :]
    lower = np.array([max(p, b + 1) for b, p, _ in starts])[:, None]
    upper = np.array([e for _, _, e in starts])[:, None]
    return wins, (positions >= lower) & (positions < upper)


def score_windows(cfg: Config, params, wins: np.ndarray, mask: np.ndarray, batch_size: int) -> float:
    """Sum of token losses (nats) over the masked targets."""
    @jax.jit
    def masked_sum(p, b, m):
        return jnp.sum(jnp.where(m, model.token_losses(p, b, cfg), 0.0))

    totals = []
    for start in range(0, len(wins), batch_size):
        batch, m = wins[start:start + batch_size], mask[start:start + batch_size]
        short = batch_size - len(batch)
        if short:  # keep one compiled shape: pad the last batch with masked rows
            batch = np.concatenate([batch, np.zeros((short, batch.shape[1]), np.int32)])
            m = np.concatenate([m, np.zeros((short, m.shape[1]), bool)])
        totals.append(masked_sum(params, batch, m))
    return float(np.sum(jax.device_get(totals)))  # one host sync for the whole pass


def evaluate_text(cfg: Config, params, tokenizer, spec, batch_size: int | None = None, stride: int | None = None) -> dict:
    stream, n_docs = token_stream(spec, tokenizer)
    return {**evaluate_stream(cfg, params, tokenizer, stream, batch_size, stride), "documents": n_docs}


def evaluate_stream(cfg: Config, params, tokenizer, stream: np.ndarray, batch_size: int | None = None,
                    stride: int | None = None) -> dict:
    """Loss, perplexity and bits per byte of an already tokenized stream (see token_stream).

    Without a stride, consecutive windows score every target once with the context its window
    gives; with one, sliding windows give each target up to n_ctx - stride tokens more context."""
    wins, mask = windows(stream, cfg.n_ctx) if stride is None else sliding_windows(stream, cfg.n_ctx, stride)
    total = score_windows(cfg, params, wins, mask, batch_size or cfg.eval_batch_size)
    n_tokens = int(mask.sum())
    targets = wins[:, 1:][mask]
    n_bytes = int(tokenizer.token_byte_lengths()[targets].sum())
    loss = total / n_tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
            "bits_per_byte": total / math.log(2) / max(n_bytes, 1),
            "tokens": n_tokens, "bytes": n_bytes}
