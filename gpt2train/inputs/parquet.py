"""The "parquet" input: windows from Parquet text (local, gs://, s3://, hf://datasets/...), streamed.

Nothing is loaded whole: a row group is read (gpt2train.text_sources.ParquetText) and tokenized
when the stream reaches it, `readers` row groups ahead of the training step in a thread pool.

Epoch e on host p of P (each host reads only files[p::P] of the sorted files):
  files in rng([seed, e]).permutation order (in order when window_order is "sequential",
  and for evaluation); each file's row groups in order; a row group's documents (the
  `text_field` column, rows in order), each followed by <|endoftext|>, joined into one stream
  cut into windows of n_ctx + 1 tokens at starts 0, n_ctx, 2 n_ctx, ... (the ragged tail of
  each row group is left out); with window_order "random", a row group's windows are taken in
  rng([seed, e, f, g]).permutation order (f: the file's index in the full list, g: the row group).
A host's batch is its next batch_size windows. The position {epoch, file, row_group, window}
goes into the checkpoint; a resumed run re-reads only the row group it stopped in.
"""

from __future__ import annotations

import concurrent.futures as futures
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from gpt2train.config import WINDOW_ORDERS
from gpt2train.errors import UserError
from gpt2train.inputs.base import WindowSource, register_input, shard_rows, split_settings
from gpt2train.paths import expand_paths
from gpt2train.text_sources import ParquetText, is_parquet

Unit = tuple[int, int, int]  # (epoch, file slot in the epoch's order, row group)


class ParquetWindows(WindowSource):
    """Windows streamed from Parquet files' text; see the module doc for the layout."""

    def __init__(self, files: Sequence[str], tokenizer, n_ctx: int, global_batch: int, *, text_field: str = "text",
                 order: str = "random", seed: int = 0, readers: int = 4, process_index: int = 0,
                 process_count: int = 1, name: str = "the data", batch_key: str = "train_batch_size"):
        if order not in WINDOW_ORDERS:
            raise UserError(f"window_order {order!r} must be one of {WINDOW_ORDERS}")
        self.batch_size = shard_rows(global_batch, process_index, process_count, batch_key)
        all_files = sorted(files)
        if len(all_files) < process_count:
            raise UserError(f"{name} has {len(all_files)} Parquet files but there are {process_count} hosts, and "
                            "each host reads its own files: split the data into more files or use fewer hosts")
        self._files = [(i, f) for i, f in enumerate(all_files) if i % process_count == process_index]
        self.n_ctx, self._tokenizer, self._field = n_ctx, tokenizer, text_field
        self._shuffle, self._seed, self._name = order == "random", int(seed), name
        self._readers = max(1, int(readers))
        self._opened: dict[str, ParquetText] = {}  # shared by the reader threads, under _opening
        self._opening = threading.Lock()
        ParquetText(self._files[0][1], text_field)  # a missing column fails now, not in the first step
        self._pool: futures.ThreadPoolExecutor | None = None
        self._ahead: dict[Unit, futures.Future] = {}
        self._pos = {"epoch": 0, "file": 0, "row_group": 0, "window": 0}

    # ------------------------------------------------------------ layout
    def _file_at(self, epoch: int, slot: int) -> tuple[int, str]:
        if not self._shuffle:
            return self._files[slot]
        return self._files[int(np.random.default_rng([self._seed, epoch]).permutation(len(self._files))[slot])]

    def _parquet(self, path: str) -> ParquetText:
        with self._opening:  # one ParquetText per file, so its reads take turns on its one handle
            if path not in self._opened:
                if len(self._opened) > 2 * self._readers:  # footers of files long passed are not needed again
                    self._opened.pop(next(iter(self._opened)))
                self._opened[path] = ParquetText(path, self._field)
            return self._opened[path]

    def _next_unit(self, unit: Unit) -> Unit:
        epoch, slot, group = unit
        if group + 1 < self._parquet(self._file_at(epoch, slot)[1]).num_row_groups:
            return epoch, slot, group + 1
        if slot + 1 < len(self._files):
            return epoch, slot + 1, 0
        return epoch + 1, 0, 0

    def _windows(self, unit: Unit) -> np.ndarray:
        """int32 [windows, n_ctx + 1] of one row group, in visiting order."""
        epoch, slot, group = unit
        index, path = self._file_at(epoch, slot)
        texts = self._parquet(path).row_group(group)
        eot = self._tokenizer.eot_id
        ids = [np.append(np.asarray(t, dtype=np.int32), eot) for t in self._tokenizer.encode_batch(texts, num_threads=1)]
        stream = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int32)
        count = max(0, (len(stream) - 1) // self.n_ctx)
        starts = np.arange(count) * self.n_ctx
        if self._shuffle:
            starts = starts[np.random.default_rng([self._seed, epoch, index, group]).permutation(count)]
        return stream[starts[:, None] + np.arange(self.n_ctx + 1)] if count else np.zeros((0, self.n_ctx + 1), np.int32)

    # ------------------------------------------------------------ reading ahead
    def _schedule(self, unit: Unit) -> None:
        """Row groups `unit` and the next readers - 1 being read; those behind `unit` dropped."""
        if self._pool is None:
            self._pool = futures.ThreadPoolExecutor(self._readers, thread_name_prefix="parquet-read")
        wanted = [unit]
        while len(wanted) < self._readers:
            wanted.append(self._next_unit(wanted[-1]))
        for stale in set(self._ahead) - set(wanted):
            self._ahead.pop(stale).cancel()
        for u in wanted:
            if u not in self._ahead:
                self._ahead[u] = self._pool.submit(self._windows, u)

    def _current(self) -> np.ndarray:
        unit = (self._pos["epoch"], self._pos["file"], self._pos["row_group"])
        self._schedule(unit)
        return self._ahead[unit].result()

    def _advance_unit(self) -> None:
        unit = (self._pos["epoch"], self._pos["file"], self._pos["row_group"])
        epoch, slot, group = self._next_unit(unit)
        self._pos = {"epoch": epoch, "file": slot, "row_group": group, "window": 0}

    # ------------------------------------------------------------ stream
    def next_window(self) -> np.ndarray:
        first_empty = None  # the first of a run of row groups without a window
        while True:
            windows = self._current()
            if self._pos["window"] < len(windows):
                self._pos["window"] += 1
                return windows[self._pos["window"] - 1]
            here = (self._pos["file"], self._pos["row_group"])
            if len(windows):
                first_empty = None
            elif first_empty is None:
                first_empty = here
            elif first_empty == here:  # around the whole epoch without a window
                raise UserError(f"{self._name} has no row group of n_ctx + 1 = {self.n_ctx + 1} tokens in this "
                                "host's files: add text or lower n_ctx")
            self._advance_unit()

    def next_batch(self) -> np.ndarray:
        return np.stack([self.next_window() for _ in range(self.batch_size)]).astype(np.int32)

    def state(self) -> dict[str, Any]:
        return dict(self._pos)

    def restore(self, state: dict[str, Any]) -> None:
        try:
            pos = {k: int(state[k]) for k in ("epoch", "file", "row_group", "window")}
        except (KeyError, TypeError, ValueError):
            raise UserError(f"saved input position {state} is not a parquet input's: resume with the input "
                            "the checkpoint was trained with") from None
        if min(pos.values()) < 0 or pos["file"] >= len(self._files):
            raise UserError(f"saved input position {state} does not fit {self._name} ({len(self._files)} files on "
                            "this host): resume with the data the checkpoint was trained on")
        self._drop_ahead()
        self._pos = pos

    def reset(self) -> None:
        self._drop_ahead()
        self._pos = {"epoch": 0, "file": 0, "row_group": 0, "window": 0}

    def _drop_ahead(self) -> None:
        for fut in self._ahead.values():
            fut.cancel()
        self._ahead = {}

    def close(self) -> None:
        self._drop_ahead()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


@register_input("parquet")
def parquet_input(cfg, split: str, tokenizer, *, process_index: int = 0, process_count: int = 1) -> WindowSource:
    """Parquet files' text_field column, streamed by row group; window_order picks the shuffling."""
    path_key, spec, global_batch, batch_key = split_settings(cfg, split)
    files = [f for f in expand_paths(spec) if is_parquet(f)]
    if not files:
        raise UserError(f"{path_key} {spec!r} holds no .parquet files: point it at Parquet files, a directory "
                        "of them, a glob, or hf://datasets/ORG/NAME/...")
    return ParquetWindows(files, tokenizer, cfg.n_ctx, global_batch, text_field=cfg.text_field,
                          order=cfg.window_order if split == "train" else "sequential", seed=cfg.seed,
                          readers=cfg.readers, process_index=process_index, process_count=process_count,
                          name=f"{path_key} {spec!r}", batch_key=batch_key)
