"""The batched scorer every task shares: log-likelihoods of token spans in one forward pass per batch.

A request is a token sequence of at most n_ctx + 1 tokens whose last `n_scored` targets are
scored: a (context, continuation) pair, or one window of a long text. For each request the scorer
returns the summed log-likelihood of those targets and whether each was the model's top choice
(lm-evaluation-harness's `is_greedy`).

Requests are sorted by length and packed into batches of a fixed number of tokens (the eval
program's eval_batch_size x n_ctx), one request per row, right-padded. Rows come in at most three
widths per task (its longest request, a half and a quarter of it, in multiples of 16): a few
compiled programs per task and never one per item, while short requests do not pay for the
longest one's width (LAMBADA's passages vary about threefold in length). On several hosts each
host puts its own rows of every global batch and reads back all rows' results.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from .. import model
from ..config import Config
from ..mesh import batch_sharding, mesh_for, replicated

ALIGN = 16  # row widths are multiples of this


@dataclass(frozen=True)
class Request:
    tokens: np.ndarray  # int32, 2 <= len <= n_ctx + 1
    n_scored: int       # the last n_scored targets (tokens[-n_scored:]) are scored


def pair_request(context: list[int], continuation: list[int], n_ctx: int) -> Request:
    """Score `continuation` after `context`, keeping the last n_ctx + 1 tokens as
    lm-evaluation-harness does (a context too long loses its start)."""
    tokens = np.asarray((list(context) + list(continuation))[-(n_ctx + 1):], np.int32)
    return Request(tokens, min(len(continuation), len(tokens) - 1))


def rolling_requests(tokens: np.ndarray, n_ctx: int, stride: int | None = None) -> list[Request]:
    """Windows that score every target of `tokens` (all but the first) exactly once, each
    target seeing up to n_ctx tokens before it. The first window scores min(n, n_ctx) targets;
    each later one `stride` more (default n_ctx) with a full window ending at its last target.
    With stride = n_ctx these are lm-evaluation-harness's loglikelihood_rolling windows."""
    stride = stride or n_ctx
    n_targets, done, out = len(tokens) - 1, 0, []
    while done < n_targets:
        k = min(n_targets - done, stride if done else n_ctx)
        end = done + k
        start = max(0, end - n_ctx)
        out.append(Request(np.asarray(tokens[start:end + 1], np.int32), k))
        done = end
    return out


def _row_scores(params, tokens, span, cfg: Config):
    """tokens [B, W + 1]; the targets at positions span[b, 0] <= t < span[b, 1] are scored
    (target t is tokens[b, t + 1]). Returns (log-likelihood [B], all greedy [B])."""
    x = model.hidden_states(params, tokens[:, :-1], cfg)
    B, W, D = x.shape
    x, targets = x.reshape(B * W, D), tokens[:, 1:].reshape(B * W)
    lls, hits = [], []
    for start in range(0, B * W, model.LOSS_ROWS):  # the head by slices, as in model.token_losses
        logits = model.logits_from_hidden(params, x[start:start + model.LOSS_ROWS], cfg)
        picked = jnp.take_along_axis(logits, targets[start:start + model.LOSS_ROWS, None], axis=-1)[:, 0]
        lls.append(picked - jax.nn.logsumexp(logits, axis=-1))
        hits.append(jnp.argmax(logits, axis=-1) == targets[start:start + model.LOSS_ROWS])
    ll, hit = jnp.concatenate(lls).reshape(B, W), jnp.concatenate(hits).reshape(B, W)
    t = jnp.arange(W)[None, :]
    scored = (t >= span[:, :1]) & (t < span[:, 1:])
    return jnp.sum(jnp.where(scored, ll, 0.0), axis=1), jnp.all(jnp.where(scored, hit, True), axis=1)


class Scorer:
    """Scores requests with one model config; compiled programs are kept across calls (a
    training run scores its tasks at every evaluation with the programs of the first)."""

    def __init__(self, cfg: Config, mesh=None):
        self.cfg = cfg
        self.mesh = mesh or mesh_for(cfg)
        self.n_devices = self.mesh.devices.size
        self.tokens_per_batch = cfg.eval_batch_size * cfg.n_ctx
        self._fn = jax.jit(lambda p, t, f: _row_scores(p, t, f, cfg),
                           out_shardings=(replicated(self.mesh), replicated(self.mesh)))
        self._rows = batch_sharding(self.mesh)

    def widths(self, longest: int) -> list[int]:
        top = min(self.cfg.n_ctx, -(-longest // ALIGN) * ALIGN)
        return sorted({max(ALIGN, min(top, -(-(top // d) // ALIGN) * ALIGN)) for d in (4, 2, 1)})

    def _put(self, rows: np.ndarray):
        if jax.process_count() == 1:
            return jax.device_put(rows, self._rows)
        share = len(rows) // jax.process_count()  # each host gives its own rows of the global batch
        mine = rows[jax.process_index() * share:(jax.process_index() + 1) * share]
        return jax.make_array_from_process_local_data(self._rows, mine)

    def score(self, params, requests: list[Request]) -> tuple[np.ndarray, np.ndarray]:
        """(log-likelihood, all-greedy) of each request, in the order given."""
        n = len(requests)
        lengths = np.array([len(r.tokens) - 1 for r in requests])
        order = np.argsort(-lengths, kind="stable")
        widths = self.widths(int(lengths.max()) if n else 1)
        quantum = self.n_devices  # rows split evenly over the devices (and so over the hosts)
        pending, i = [], 0
        while i < n:
            width = next(w for w in widths if w >= lengths[order[i]])
            rows = max(quantum, self.tokens_per_batch // width // quantum * quantum)
            take = order[i:i + rows]
            tokens = np.zeros((rows, width + 1), np.int32)
            span = np.zeros((rows, 2), np.int32)  # padding rows score nothing
            for row, index in enumerate(take):
                r = requests[index]
                tokens[row, :len(r.tokens)] = r.tokens
                span[row] = (len(r.tokens) - 1 - r.n_scored, len(r.tokens) - 1)
            pending.append((take, self._fn(params, self._put(tokens), self._put(span))))
            i += len(take)
        ll, greedy = np.zeros(n), np.zeros(n, bool)
        for take, (batch_ll, batch_greedy) in pending:  # one host sync at the end
            batch_ll, batch_greedy = jax.device_get((batch_ll, batch_greedy))
            ll[take], greedy[take] = batch_ll[:len(take)], batch_greedy[:len(take)]
        return ll, greedy
