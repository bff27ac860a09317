"""The batched scorer every task shares: log-likelihoods of token spans, many texts per forward pass.

A request is a token sequence of at most n_ctx + 1 tokens whose last `n_scored` targets are
scored: a (context, continuation) pair, or one window of a long text. For each request the scorer
returns the summed log-likelihood of those targets and whether each was the model's top choice
(lm-evaluation-harness's `is_greedy`).

What the forward passes compute, and why:
- Requests with the same context (HellaSwag's four endings) form one unit: the context once, then
  each continuation's tokens, which attend to the context and to themselves only. The context's
  last position predicts every continuation's first token.
- Units are packed into rows of one width (best fit, longest first), each token with its own
  position and an attention mask that keeps the units apart: padding only at a row's end, where
  one request a row padded every row to the longest in its batch.
- The output head (a third of a 124M forward pass) runs only at the scored positions, gathered
  from the whole batch, not at every token.
A batch is eval_batch_size x n_ctx tokens (fewer rows for the last one). Each (rows, width, scored
targets) shape is one compiled program, kept across calls: a few per task, never one per item.
Rows that each hold one lone request use the plain causal attention. On several hosts each host
puts its own rows of every batch and reads back all rows' results.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from .. import model
from ..config import Config
from ..mesh import batch_sharding, mesh_for, replicated

MIN_WIDTH = 64  # the narrowest row: rows are the smallest power of two that holds the longest unit


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


@dataclass
class _Unit:
    """A context and the continuations of every request that shares it, as one run of input tokens."""
    tokens: np.ndarray     # [L] input tokens: the context, then each continuation but its last token
    positions: np.ndarray  # [L] each token's position in its own request
    branch: np.ndarray     # [L] 0 for the context, b for the b-th continuation
    offsets: np.ndarray    # [S] the input offset whose next-token prediction is scored
    targets: np.ndarray    # [S] the scored target tokens
    owners: np.ndarray     # [S] the request each scored target belongs to


def _unit(requests: list[Request], members: list[int], context_len: int) -> _Unit:
    first = requests[members[0]].tokens
    tokens, positions, branch = [first[:context_len]], [np.arange(context_len)], [np.zeros(context_len, np.int32)]
    offsets, targets, owners, length = [], [], [], context_len
    for b, i in enumerate(members, 1):
        cont = requests[i].tokens[context_len:]  # the n_scored targets
        k = len(cont)
        tokens.append(cont[:-1])
        positions.append(context_len + np.arange(k - 1))
        branch.append(np.full(k - 1, b, np.int32))
        offsets.append(np.concatenate([[context_len - 1], length + np.arange(k - 1)]))
        targets.append(cont)
        owners.append(np.full(k, i))
        length += k - 1
    cat = np.concatenate
    return _Unit(cat(tokens).astype(np.int32), cat(positions).astype(np.int32), cat(branch).astype(np.int32),
                 cat(offsets).astype(np.int32), cat(targets).astype(np.int32), cat(owners))


def _units(requests: list[Request], width: int) -> list[_Unit]:
    """Requests grouped by their unscored context; a group too long for one row is split."""
    groups: dict[bytes, list[int]] = {}
    for i, r in enumerate(requests):
        groups.setdefault(r.tokens[:len(r.tokens) - r.n_scored].tobytes(), []).append(i)
    units = []
    for members in groups.values():
        context_len = len(requests[members[0]].tokens) - requests[members[0]].n_scored
        part, length = [], context_len
        for i in members:  # each request alone fits: len(tokens) - 1 <= n_ctx
            extra = requests[i].n_scored - 1
            if part and length + extra > width:
                units.append(_unit(requests, part, context_len))
                part, length = [], context_len
            part.append(i)
            length += extra
        units.append(_unit(requests, part, context_len))
    return units


def _pack(units: list[_Unit], width: int) -> list[list[int]]:
    """Best-fit decreasing: each unit, longest first, into the fullest row it fits in."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row), sorted
    for u in sorted(range(len(units)), key=lambda u: -len(units[u].tokens)):
        n = len(units[u].tokens)
        j = bisect.bisect_left(free, (n, -1))
        if j == len(free):
            rows.append([u])
            room, row = width - n, len(rows) - 1
        else:
            room, row = free.pop(j)
            rows[row].append(u)
            room -= n
        if room > 0:
            bisect.insort(free, (room, row))
    return rows


@dataclass
class _Batch:
    arrays: tuple            # tokens, positions, segment, branch [R, W] (split by rows over devices)
    targets: tuple           # offsets into the flattened [R * W] batch, target tokens [S] (every device)
    packed: bool             # False: every row one lone request (plain causal attention)
    owners: np.ndarray       # the request of each scored target (the first len(owners) of S)


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _batch_scores(params, tokens, positions, segment, branch, offsets, targets, cfg: Config, packed: bool):
    """Log-likelihood and top-choice flag [S] of each target at its offset (see _Batch)."""
    if packed:
        q = jnp.arange(tokens.shape[1])
        mask = ((segment[:, :, None] == segment[:, None, :]) & (q[None, None, :] <= q[None, :, None])
                & ((branch[:, None, :] == 0) | (branch[:, None, :] == branch[:, :, None])))
        x = model.hidden_states(params, tokens, cfg, positions=positions, mask=mask)
    else:
        x = model.hidden_states(params, tokens, cfg)
    x = x.reshape(-1, x.shape[-1])[offsets]
    lls, hits = [], []
    for start in range(0, len(offsets), model.LOSS_ROWS):  # the head by slices, as in model.token_losses
        logits = model.logits_from_hidden(params, x[start:start + model.LOSS_ROWS], cfg)
        picked = jnp.take_along_axis(logits, targets[start:start + model.LOSS_ROWS, None], axis=-1)[:, 0]
        lls.append(picked - jax.nn.logsumexp(logits, axis=-1))
        hits.append(jnp.argmax(logits, axis=-1) == targets[start:start + model.LOSS_ROWS])
    return jnp.concatenate(lls), jnp.concatenate(hits)


class Scorer:
    """Scores requests with one model config; compiled programs and each request list's packing
    are kept across calls (a training run scores its tasks at every evaluation)."""

    def __init__(self, cfg: Config, mesh=None):
        self.cfg = cfg
        self.mesh = mesh or mesh_for(cfg)
        self.n_devices = self.mesh.devices.size
        self.tokens_per_batch = cfg.eval_batch_size * cfg.n_ctx
        self._fn = jax.jit(lambda p, *arrays, packed: _batch_scores(p, *arrays, cfg, packed), static_argnames="packed",
                           out_shardings=(replicated(self.mesh), replicated(self.mesh)))
        self._rows, self._everywhere = batch_sharding(self.mesh), replicated(self.mesh)
        self._plans: dict[int, tuple[list, list[_Batch]]] = {}

    def width(self, longest: int) -> int:
        return min(self.cfg.n_ctx, max(MIN_WIDTH, _pow2(longest)))

    def _put(self, rows: np.ndarray):
        if jax.process_count() == 1:
            return jax.device_put(rows, self._rows)
        share = len(rows) // jax.process_count()  # each host gives its own rows of the global batch
        mine = rows[jax.process_index() * share:(jax.process_index() + 1) * share]
        return jax.make_array_from_process_local_data(self._rows, mine)

    def _put_everywhere(self, a: np.ndarray):
        if jax.process_count() == 1:
            return jax.device_put(a, self._everywhere)
        return jax.make_array_from_process_local_data(self._everywhere, a)  # every host holds all of it

    def plan(self, requests: list[Request]) -> list[_Batch]:
        units = _units(requests, self.cfg.n_ctx)
        width = self.width(max(len(u.tokens) for u in units))
        rows = _pack(units, width)
        scored = [sum(len(units[u].targets) for u in row) for row in rows]
        order = np.argsort(scored, kind="stable")[::-1]  # rows of similar counts share a batch
        rows, scored = [rows[i] for i in order], [scored[i] for i in order]
        quantum = self.n_devices  # rows split evenly over the devices (and so over the hosts)
        per_batch = max(quantum, self.tokens_per_batch // width // quantum * quantum)
        step = max(quantum, per_batch // 8 // quantum * quantum)  # a last short batch: fewer rows, a few sizes
        starts = range(0, len(rows), per_batch)
        # The scored targets of every batch fit one size: one program for the task's full batches.
        S = -(-max(sum(scored[i:i + per_batch]) for i in starts) // 128) * 128
        batches = []
        for first in starts:
            chunk = rows[first:first + per_batch]
            R = min(per_batch, -(-len(chunk) // step) * step)
            tokens, positions, segment, branch = (np.zeros((R, width), np.int32) for _ in range(4))
            offsets, targets, owners, slot = np.zeros(S, np.int32), np.zeros(S, np.int32), [], 0
            for r, row in enumerate(chunk):
                at = 0
                for seg, u in enumerate(row, 1):
                    unit = units[u]
                    n, k = len(unit.tokens), len(unit.targets)
                    tokens[r, at:at + n], positions[r, at:at + n] = unit.tokens, unit.positions
                    segment[r, at:at + n], branch[r, at:at + n] = seg, unit.branch
                    offsets[slot:slot + k], targets[slot:slot + k] = r * width + at + unit.offsets, unit.targets
                    owners.append(unit.owners)
                    at, slot = at + n, slot + k
            packed = any(len(row) > 1 or units[row[0]].branch.max(initial=0) > 1 for row in chunk)
            batches.append(_Batch((tokens, positions, segment, branch), (offsets, targets), packed,
                                  np.concatenate(owners)))
        return batches

    def score(self, params, requests: list[Request]) -> tuple[np.ndarray, np.ndarray]:
        """(log-likelihood, all-greedy) of each request, in the order given."""
        n = len(requests)
        if not n:
            return np.zeros(0), np.zeros(0, bool)
        if id(requests) not in self._plans:  # the list is kept with its plan, so its id stays its own
            self._plans[id(requests)] = (requests, self.plan(requests))
        batches = self._plans[id(requests)][1]
        pending = [self._fn(params, *(self._put(a) for a in b.arrays), *(self._put_everywhere(a) for a in b.targets),
                            packed=b.packed) for b in batches]
        ll, misses = np.zeros(n), np.zeros(n, np.int64)
        for b, (batch_ll, batch_hit) in zip(batches, pending):  # one host sync at the end
            batch_ll, batch_hit = jax.device_get((batch_ll, batch_hit))
            k = len(b.owners)
            np.add.at(ll, b.owners, batch_ll[:k].astype(np.float64))
            np.add.at(misses, b.owners, ~batch_hit[:k])
        return ll, misses == 0
