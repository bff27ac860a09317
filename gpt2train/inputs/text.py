"""The "text" input: text files tokenized once, as they are (no cleaning), kept in memory.

Each plain file is one document, each line of a .jsonl file one (its "text" field): the
documents gpt2train.text_sources reads for every command.

How `DocumentWindows` lays out epoch e (the contract tests rebuild independently):
  rng = np.random.default_rng([seed, e])
  documents in order rng.permutation(n_docs), each followed by <|endoftext|>, concatenated;
  window w = stream[w * n_ctx : w * n_ctx + n_ctx + 1] for w < (len(stream) - 1) // n_ctx;
  windows visited in order rng.permutation(num_windows).
Unshuffled sources (eval) keep file order and window order. Epochs follow each other in one
endless stream of windows; global batch b holds stream positions [b * B, (b + 1) * B), and
process p of P takes rows p::P of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from gpt2train.errors import UserError
from gpt2train.inputs.base import WindowSource, register_input, split_settings
from gpt2train.paths import expand_paths
from gpt2train.text_sources import token_documents


class DocumentWindows(WindowSource):
    """Windows stitched from in-memory token documents; see the module doc for the layout."""

    def __init__(self, docs: Sequence[np.ndarray], eot_id: int, n_ctx: int, global_batch: int, **stream):
        """`stream`: seed, shuffle, process_index, process_count, name, batch_key (WindowSource._place)."""
        self._place(global_batch, **stream)
        name = self._name
        # Each document carries its trailing <|endoftext|>, so an epoch is one concatenation.
        dtype = _token_dtype(docs, eot_id)
        self._docs = [np.append(np.asarray(d), eot_id).astype(dtype) for d in docs]
        n_tokens = sum(len(d) for d in self._docs)
        if n_tokens < n_ctx + 1:
            raise UserError(
                f"{name} has {n_tokens} tokens (with one <|endoftext|> per document) but one window of "
                f"n_ctx + 1 = {n_ctx + 1} tokens is needed: add text or lower n_ctx"
            )
        self.n_ctx = n_ctx
        self.num_windows = (n_tokens - 1) // n_ctx  # windows per epoch
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._pos = 0  # windows consumed from the endless stream, all processes together

    def _layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(token stream, window visiting order) of an epoch."""
        key = epoch if self._shuffle else 0  # unshuffled epochs are all alike
        if key not in self._cache:
            if self._shuffle:
                rng = np.random.default_rng([self._seed, epoch])
                stream = np.concatenate([self._docs[i] for i in rng.permutation(len(self._docs))])
                order = rng.permutation(self.num_windows)
            else:
                stream, order = np.concatenate(self._docs), np.arange(self.num_windows)
            # A batch spans at most this epoch and the next, unless the data is tiny.
            self._cache = {k: v for k, v in self._cache.items() if k == key - 1}
            self._cache[key] = (stream, order)
        return self._cache[key]

    def next_batch(self) -> np.ndarray:
        positions = self._pos + np.arange(self._process_index, self._global_batch, self._process_count)
        epochs, indices = np.divmod(positions, self.num_windows)
        batch = np.empty((self.batch_size, self.n_ctx + 1), dtype=np.int32)
        offsets = np.arange(self.n_ctx + 1)
        for epoch in np.unique(epochs):
            stream, order = self._layout(int(epoch))
            rows = epochs == epoch
            starts = order[indices[rows]] * self.n_ctx
            batch[rows] = stream[starts[:, None] + offsets]
        self._pos += self._global_batch
        return batch

    def state(self) -> dict[str, int]:
        epoch, index = divmod(self._pos, self.num_windows)
        return {"epoch": int(epoch), "index": int(index)}

    def restore(self, state: dict[str, Any]) -> None:
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index < self.num_windows:
            raise UserError(
                f"saved input position {state} does not fit this data "
                f"({self.num_windows} windows per epoch): resume with the data and n_ctx the checkpoint used"
            )
        self._pos = epoch * self.num_windows + index

    def reset(self) -> None:
        self._pos = 0


def _token_dtype(docs: Sequence[np.ndarray], eot_id: int) -> type:
    largest = max([eot_id] + [int(np.max(d)) for d in docs if len(d)])
    return np.uint16 if largest < 2**16 else np.int32  # halves the memory of GPT-2-sized vocabularies


# ---------------------------------------------------------------- the "text" input


@register_input("text")
def text_input(cfg, split: str, tokenizer, *, process_index: int = 0, process_count: int = 1) -> WindowSource:
    """UTF-8 text files (a .jsonl file: one document per line; a .parquet file: one per row); tokenized once
    and kept in memory."""
    path_key, spec, global_batch, batch_key = split_settings(cfg, split)
    docs = token_documents(expand_paths(spec), tokenizer, text_field=getattr(cfg, "text_field", "text"))  # a bare namespace as cfg (tests) reads "text"
    return DocumentWindows(
        docs,
        tokenizer.eot_id,
        cfg.n_ctx,
        global_batch,
        seed=cfg.seed,
        shuffle=split == "train",
        process_index=process_index,
        process_count=process_count,
        name=f"{path_key} {spec!r}",
        batch_key=batch_key,
    )

