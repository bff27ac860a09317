"""What every input shares: the registry of named inputs, the WindowSource contract, helpers.

An input is a factory registered by name (the config's "input" key):

    factory(cfg, split, tokenizer, *, process_index=0, process_count=1) -> WindowSource

A WindowSource yields batches of windows of n_ctx + 1 tokens (inputs are window[:-1],
targets window[1:]). Its position is a small dict, so a checkpoint can store it and a
restored run sees exactly the batches it would have seen. Each host builds its own source
and reads only its share (batch_size = global batch / process_count rows) of every global batch.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import numpy as np

from gpt2train.errors import UserError

# ---------------------------------------------------------------- registry

InputFactory = Callable[..., "WindowSource"]
_INPUTS: dict[str, InputFactory] = {}


def register_input(name: str) -> Callable[[InputFactory], InputFactory]:
    """Decorator: make `factory` available as config "input": name."""

    def register(factory: InputFactory) -> InputFactory:
        if name in _INPUTS:
            raise ValueError(f"input {name!r} is already registered")
        _INPUTS[name] = factory
        return factory

    return register


def input_names() -> list[str]:
    """The registered input names, sorted."""
    return sorted(_INPUTS)


def get_input(name: str) -> InputFactory:
    if name not in _INPUTS:
        known = ", ".join(repr(n) for n in input_names())
        raise UserError(f'unknown input {name!r}: set "input" in the config to one of {known}')
    return _INPUTS[name]


# ---------------------------------------------------------------- sources


class WindowSource(abc.ABC):
    """Batches of token windows; `batch_size` rows (this process's share) of n_ctx + 1 tokens."""

    batch_size: int
    n_ctx: int

    @abc.abstractmethod
    def next_batch(self) -> np.ndarray:
        """int32 [batch_size, n_ctx + 1]."""

    @abc.abstractmethod
    def state(self) -> dict[str, Any]:
        """JSON-serialisable position in the stream."""

    @abc.abstractmethod
    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a position returned by state()."""

    @abc.abstractmethod
    def reset(self) -> None:
        """Back to the first batch (eval runs over the same batches every time)."""

    def _place(self, global_batch: int, *, seed: int = 0, shuffle: bool = True, process_index: int = 0,
               process_count: int = 1, name: str = "the data", batch_key: str = "train_batch_size") -> None:
        """What every stream is given beside its data: this process's share of the global batch (named by
        its config key in errors), the seed and whether to shuffle, and the data's name for messages."""
        self.batch_size = shard_rows(global_batch, process_index, process_count, batch_key)
        if shuffle and (not isinstance(seed, (int, np.integer)) or seed < 0):
            raise UserError(f"seed {seed!r} must be a non-negative integer: fix \"seed\" in the config")
        self._global_batch = global_batch
        self._process_index, self._process_count = process_index, process_count
        self._seed, self._shuffle, self._name = int(seed), shuffle, name

    def close(self) -> None:
        """Release what the source holds (a reading thread); by default there is nothing to release."""

    @property
    def skipped_records(self) -> int:
        """Damaged records passed over under skip_corrupt_records so far, each time one is read."""
        return 0


# ---------------------------------------------------------------- helpers for factories


def shard_rows(global_batch: int, process_index: int, process_count: int, what: str) -> int:
    """This process's rows of a global batch; `what` is the batch size's config key."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is outside 0..{process_count - 1}")
    if global_batch < 1 or global_batch % process_count:
        raise UserError(
            f"{what} {global_batch} must be a positive multiple of the number of processes "
            f"({process_count}) so each host gets the same number of rows: change {what}"
        )
    return global_batch // process_count


def split_settings(cfg, split: str) -> tuple[str, Any, int, str]:
    """(config key of the paths, their value, global batch size, its config key) of a split."""
    if split == "train":
        return "data_path", cfg.data_path, cfg.train_batch_size, "train_batch_size"
    if split == "eval":
        if cfg.eval_data_path is None:
            raise UserError('evaluation needs "eval_data_path" in the config: set it to held-out text files')
        return "eval_data_path", cfg.eval_data_path, cfg.eval_batch_size, "eval_batch_size"
    raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
