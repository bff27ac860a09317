"""Windows from .tfrecords the seed's way, streamed file by file; the "tfrecords" input.

Epoch e of one source, on host p of P (each host reads only files[p::P]):
  file order: rng([seed, e]).permutation of this host's files (unshuffled for eval);
  in file f (its index in the full sorted list): documents in rng([seed, e, f]).permutation
  order, each followed by <|endoftext|>, grouped `stitch` at a time; a group shorter than
  n_ctx + 1 tokens absorbs the following groups until it is long enough (a short tail joins
  the group before it; a file too short for one window yields none);
  each group gives one window of n_ctx + 1 tokens at a random offset inside the group
  (drawn from the same generator), so a window never leaves its group.
A host's batch is its next batch_size windows. The position {epoch, file, window} is saved
with the checkpoint; resuming re-reads only the current file.

Mixtures draw, per batch, which source each of this host's rows comes from with
rng([seed, 1, p, batch]) and the configured weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from gpt2train import records
from gpt2train.encode import check_manifests
from gpt2train.errors import UserError
from gpt2train.inputs.base import WindowSource, register_input, shard_rows, split_settings
from gpt2train.paths import expand_paths


def stitch_for(cfg) -> int:
    """`stitch` from the config, or enough minimum-size documents to fill one window."""
    if cfg.stitch:
        return int(cfg.stitch)
    return max(1, math.ceil((cfg.n_ctx + 1) / max(cfg.minimum_size, 1)))


def file_groups(docs: Sequence[np.ndarray], eot_id: int, stitch: int, window: int) -> list[np.ndarray]:
    """Token groups of one file (documents already in visiting order), each >= window tokens."""
    groups: list[np.ndarray] = []
    pending: list[np.ndarray] = []
    pending_len = 0
    for start in range(0, len(docs), stitch):
        for doc in docs[start : start + stitch]:
            pending.append(doc)
            pending.append(np.array([eot_id], dtype=doc.dtype))
            pending_len += len(doc) + 1
        if pending_len >= window:
            groups.append(np.concatenate(pending))
            pending, pending_len = [], 0
    if pending:
        if groups:
            groups[-1] = np.concatenate([groups[-1], *pending])
    return groups


class RecordWindows(WindowSource):
    """One stream of windows over a list of .tfrecords files; see the module doc."""

    def __init__(self, files: Sequence[str], eot_id: int, n_ctx: int, global_batch: int, *, stitch: int,
                 skip_corrupt: bool = False, n_vocab: int | None = None, **stream):
        """`stream`: seed, shuffle, process_index, process_count, name, batch_key (WindowSource._place)."""
        self._place(global_batch, **stream)
        name, process_index, process_count = self._name, self._process_index, self._process_count
        self._n_vocab = n_vocab  # ids outside [0, n_vocab) stop the run (or are skipped): never fed to the model
        all_files = sorted(files)
        if len(all_files) < process_count:
            raise UserError(
                f"{name} has {len(all_files)} files but there are {process_count} hosts, and each host reads "
                f"its own files: encode into more files (smaller --files_per) or use fewer hosts"
            )
        # (index in the full list, path): the index seeds the file's document order on any host.
        self._files = [(i, f) for i, f in enumerate(all_files) if i % process_count == process_index]
        self.n_ctx, self._eot, self._stitch = n_ctx, eot_id, max(1, int(stitch))
        self._skip = skip_corrupt
        self._epoch, self._file, self._window = 0, 0, 0
        self._current: tuple[tuple[int, int], list[np.ndarray]] | None = None  # ((epoch, file), windows)
        self.stats = records.ReadStats()

    # ------------------------------------------------------------ layout
    def _file_order(self, epoch: int) -> list[tuple[int, str]]:
        if not self._shuffle:
            return self._files
        order = np.random.default_rng([self._seed, epoch]).permutation(len(self._files))
        return [self._files[i] for i in order]

    def _windows_of(self, epoch: int, slot: int) -> list[np.ndarray]:
        key = (epoch if self._shuffle else 0, slot)
        if self._current is not None and self._current[0] == key:
            return self._current[1]
        index, path = self._file_order(epoch)[slot]
        docs = [tokens.astype(np.int32) for tokens, _ in
                records.read_documents(path, skip_corrupt=self._skip, stats=self.stats, n_vocab=self._n_vocab)]
        rng = np.random.default_rng([self._seed, key[0], index])
        if self._shuffle:
            docs = [docs[i] for i in rng.permutation(len(docs))]
        size = self.n_ctx + 1
        windows = []
        for group in file_groups(docs, self._eot, self._stitch, size):
            start = int(rng.integers(0, len(group) - size + 1))
            windows.append(group[start : start + size])
        self._current = (key, windows)
        return windows

    # ------------------------------------------------------------ stream
    def next_window(self) -> np.ndarray:
        files_seen_empty = 0
        while True:
            windows = self._windows_of(self._epoch, self._file)
            if self._window < len(windows):
                self._window += 1
                return windows[self._window - 1]
            files_seen_empty = files_seen_empty + 1 if not windows else 0
            self._file, self._window = self._file + 1, 0
            if self._file == len(self._files):
                self._epoch, self._file = self._epoch + 1, 0
            if files_seen_empty > len(self._files):
                raise UserError(
                    f"{self._name} has no document group of n_ctx + 1 = {self.n_ctx + 1} tokens in this host's "
                    f"files: add data, lower n_ctx, or raise stitch"
                )

    def next_batch(self) -> np.ndarray:
        return np.stack([self.next_window() for _ in range(self.batch_size)]).astype(np.int32)

    def state(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "file": self._file, "window": self._window}

    def restore(self, state: dict[str, Any]) -> None:
        epoch, slot, window = int(state["epoch"]), int(state["file"]), int(state["window"])
        if epoch < 0 or not 0 <= slot < len(self._files) or window < 0:
            raise UserError(
                f"saved input position {state} does not fit {self._name} ({len(self._files)} files on this host): "
                "resume with the data the checkpoint was trained on"
            )
        self._epoch, self._file, self._window = epoch, slot, window

    def reset(self) -> None:
        self._epoch, self._file, self._window = 0, 0, 0

    @property
    def skipped_records(self) -> int:
        return self.stats.skipped


class MixedWindows(WindowSource):
    """Rows drawn from several sources with fixed weights (e.g. short and long documents)."""

    def __init__(self, sources: Sequence[RecordWindows], weights: Sequence[float], global_batch: int, *,
                 seed: int = 0, process_index: int = 0, process_count: int = 1, batch_key: str = "train_batch_size"):
        if len(sources) != len(weights) or not sources:
            raise UserError(f"data_weights {list(weights)} must give one weight per data path ({len(sources)})")
        weights = np.asarray(weights, dtype=np.float64)
        if (weights < 0).any() or weights.sum() <= 0:
            raise UserError(f"data_weights {weights.tolist()} must be non-negative and not all zero")
        self._p = weights / weights.sum()
        self._sources, self._seed = list(sources), int(seed)
        self.batch_size = shard_rows(global_batch, process_index, process_count, batch_key)
        self._process_index = process_index
        self.n_ctx = sources[0].n_ctx
        self._batches = 0

    def next_batch(self) -> np.ndarray:
        rng = np.random.default_rng([self._seed, 1, self._process_index, self._batches])
        picks = rng.choice(len(self._sources), size=self.batch_size, p=self._p)
        self._batches += 1
        return np.stack([self._sources[i].next_window() for i in picks]).astype(np.int32)

    def state(self) -> dict[str, Any]:
        return {"batches": self._batches, "sources": [s.state() for s in self._sources]}

    def restore(self, state: dict[str, Any]) -> None:
        if len(state.get("sources", ())) != len(self._sources):
            raise UserError(f"saved input position {state} is for another mixture: resume with the same data paths")
        self._batches = int(state["batches"])
        for source, s in zip(self._sources, state["sources"]):
            source.restore(s)

    def reset(self) -> None:
        self._batches = 0
        for source in self._sources:
            source.reset()

    @property
    def skipped_records(self) -> int:
        return sum(source.skipped_records for source in self._sources)


# ---------------------------------------------------------------- registered inputs


def record_source(cfg, split: str, tokenizer, key: str, spec, stitch: int, *, process_index: int = 0,
                  process_count: int = 1) -> RecordWindows:
    """The .tfrecords files of `spec`, the value of config key `key` (named so in errors)."""
    _, _, global_batch, batch_key = split_settings(cfg, split)
    files = [f for f in expand_paths(spec) if f.endswith(".tfrecords")]
    if not files:
        raise UserError(f"{key} {spec!r} holds no .tfrecords files: encode text with `python -m gpt2train encode`")
    check_manifests(files, tokenizer, key)
    return RecordWindows(
        files, tokenizer.eot_id, cfg.n_ctx, global_batch, stitch=stitch, seed=cfg.seed, shuffle=split == "train",
        process_index=process_index, process_count=process_count, skip_corrupt=cfg.skip_corrupt_records,
        name=f"{key} {spec!r}", batch_key=batch_key, n_vocab=tokenizer.n_vocab,
    )


def record_mixture(cfg, split: str, tokenizer, parts, weights, *, process_index: int = 0,
                   process_count: int = 1) -> WindowSource:
    """One source per (config key, paths, stitch) part, mixed by `weights`; a single part is used alone."""
    _, _, global_batch, batch_key = split_settings(cfg, split)
    sources = [
        record_source(cfg, split, tokenizer, key, spec, stitch, process_index=process_index,
                      process_count=process_count)
        for key, spec, stitch in parts
    ]
    if len(sources) == 1:
        return sources[0]
    return MixedWindows(sources, weights, global_batch, seed=cfg.seed, process_index=process_index,
                        process_count=process_count, batch_key=batch_key)


@register_input("tfrecords")
def tfrecords_input(cfg, split, tokenizer, *, process_index=0, process_count=1):
    """BPE .tfrecords: data_path (a list with data_weights makes a mixture), stitch or minimum_size."""
    path_key, spec, _, _ = split_settings(cfg, split)
    hosts = {"process_index": process_index, "process_count": process_count}
    if split == "train" and cfg.data_weights:
        specs = list(spec) if isinstance(spec, (list, tuple)) else [spec]
        if len(specs) != len(cfg.data_weights):
            raise UserError(
                f"data_weights has {len(cfg.data_weights)} weights but data_path has {len(specs)} entries: "
                "give one weight per entry"
            )
        keys = [f"{path_key}[{i}]" for i in range(len(specs))] if isinstance(spec, (list, tuple)) else [path_key]
        parts = [(key, s, stitch_for(cfg)) for key, s in zip(keys, specs)]
        return record_mixture(cfg, split, tokenizer, parts, cfg.data_weights, **hosts)
    return record_source(cfg, split, tokenizer, path_key, spec, stitch_for(cfg), **hosts)
