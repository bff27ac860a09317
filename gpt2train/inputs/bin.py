"""The "bin" input: windows from nanoGPT's `.bin` files and llm.c's token shards (gpt2train/shards.py).

The shards (data_path's `.bin` files, sorted) form one stream of tokens per file; a window is
n_ctx + 1 consecutive tokens of one file. Global batch b (all hosts together) holds
train_batch_size windows; host p of P takes rows p::P, so every host reads only its own rows.

  window_order "random" (nanoGPT's way): batch b's windows start at offsets drawn uniformly
    over every start that fits, in all files together, by rng([seed, b]);
  window_order "sequential" (llm.c's way), and always for evaluation: the files' windows at
    starts 0, n_ctx, 2 n_ctx, ... one file after another, batch b holding windows
    [b B, (b + 1) B) of that list, wrapping around at its end.

Either way the position is the number of batches read ({"batches": b}), so a resumed run
draws exactly the batches an uninterrupted one would. Ids are checked against n_vocab as they
are read. Local files are memory-mapped; remote ones (gs://, s3://, hf://) are read a batch's
ranges at a time, retried with backoff.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import fsspec
import numpy as np

from gpt2train import shards
from gpt2train.config import WINDOW_ORDERS
from gpt2train.errors import UserError
from gpt2train.inputs.base import WindowSource, register_input, shard_rows, split_settings
from gpt2train.paths import expand_paths, local_path, with_retries


class _Shard:
    """One file's ids: a memory map when local, ranged reads when remote."""

    def __init__(self, info: shards.ShardInfo):
        self.info = info
        local = local_path(info.path)
        self._map = (np.memmap(local, dtype=info.dtype, mode="r", offset=info.offset, shape=(info.tokens,))
                     if local is not None and info.tokens else None)

    def windows(self, starts: np.ndarray, size: int) -> np.ndarray:
        if self._map is not None:
            return np.asarray(self._map[starts[:, None] + np.arange(size)])
        itemsize = self.info.dtype.itemsize
        begin = [self.info.offset + int(s) * itemsize for s in starts]
        end = [b + size * itemsize for b in begin]
        fs, path = fsspec.core.url_to_fs(self.info.path)
        blobs = with_retries(lambda: fs.cat_ranges([path] * len(begin), begin, end), self.info.path)
        return np.stack([np.frombuffer(b, dtype=self.info.dtype) for b in blobs])


class ShardWindows(WindowSource):
    """Windows of n_ctx + 1 tokens from token shards; see the module doc for the layout."""

    def __init__(self, files: Sequence[str], n_ctx: int, global_batch: int, n_vocab: int, *,
                 order: str = "random", seed: int = 0, process_index: int = 0, process_count: int = 1,
                 name: str = "the data", batch_key: str = "train_batch_size"):
        if order not in WINDOW_ORDERS:
            raise UserError(f"window_order {order!r} must be one of {WINDOW_ORDERS}")
        self.batch_size = shard_rows(global_batch, process_index, process_count, batch_key)
        self.n_ctx, self._n_vocab, self._order, self._seed = n_ctx, n_vocab, order, int(seed)
        self._global_batch, self._rows = global_batch, slice(process_index, None, process_count)
        self._shards = [_Shard(shards.inspect(f)) for f in sorted(files)]
        tokens = np.array([s.info.tokens for s in self._shards], dtype=np.int64)
        size = n_ctx + 1
        # random: every start that leaves room for a window; sequential: starts at multiples of n_ctx
        per_file = np.maximum(tokens - n_ctx, 0) if order == "random" else np.maximum((tokens - 1) // n_ctx, 0)
        if per_file.sum() == 0:
            raise UserError(f"{name} has no file with n_ctx + 1 = {size} tokens (the largest has "
                            f"{int(tokens.max())}): add data or lower n_ctx")
        self._ends = np.cumsum(per_file)  # windows (or starts) of files [0, i]
        self._batches = 0

    @property
    def num_windows(self) -> int:
        return int(self._ends[-1])

    def _global_indices(self, batch: int) -> np.ndarray:
        if self._order == "random":
            return np.random.default_rng([self._seed, batch]).integers(0, self.num_windows, self._global_batch)
        return (batch * self._global_batch + np.arange(self._global_batch)) % self.num_windows

    def next_batch(self) -> np.ndarray:
        index = self._global_indices(self._batches)[self._rows]
        files = np.searchsorted(self._ends, index, side="right")
        within = index - np.concatenate([[0], self._ends])[files]
        starts = within if self._order == "random" else within * self.n_ctx
        batch = np.empty((self.batch_size, self.n_ctx + 1), dtype=np.int32)
        for f in np.unique(files):
            rows = files == f
            shard = self._shards[int(f)]
            ids = shard.windows(starts[rows], self.n_ctx + 1)
            shards.check_ids(ids, self._n_vocab, shard.info)
            batch[rows] = ids
        self._batches += 1
        return batch

    def state(self) -> dict[str, Any]:
        return {"batches": self._batches}

    def restore(self, state: dict[str, Any]) -> None:
        if "batches" not in state or int(state["batches"]) < 0:
            raise UserError(f"saved input position {state} is not a bin input's: resume with the input "
                            "the checkpoint was trained with")
        self._batches = int(state["batches"])

    def reset(self) -> None:
        self._batches = 0


@register_input("bin")
def bin_input(cfg, split: str, tokenizer, *, process_index: int = 0, process_count: int = 1) -> WindowSource:
    """nanoGPT .bin files or llm.c shards (detected by their header); window_order picks the sampling."""
    path_key, spec, global_batch, batch_key = split_settings(cfg, split)
    files = [f for f in expand_paths(spec) if f.endswith(".bin")]
    if not files:
        raise UserError(f"{path_key} {spec!r} holds no .bin files: point it at nanoGPT's train.bin / val.bin, "
                        "llm.c shards, or the output of `python -m gpt2train encode --format bin`")
    return ShardWindows(files, cfg.n_ctx, global_batch, cfg.n_vocab,
                        order=cfg.window_order if split == "train" else "sequential", seed=cfg.seed,
                        process_index=process_index, process_count=process_count,
                        name=f"{path_key} {spec!r}", batch_key=batch_key)
