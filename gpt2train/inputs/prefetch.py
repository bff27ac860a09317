"""Read batches ahead in a background thread so reading and decoding overlap the train step.

The wrapper reports the position of the last batch *handed out*, not of the last one read,
so a checkpoint taken at any step resumes exactly where training was.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

from gpt2train.inputs.base import WindowSource

_DONE = object()


class Prefetched(WindowSource):
    """`source` read up to `depth` batches ahead by a thread, started at the first next_batch()."""

    def __init__(self, source: WindowSource, depth: int):
        self.source, self.depth = source, max(1, int(depth))
        self.batch_size, self.n_ctx = source.batch_size, source.n_ctx
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._state = source.state()

    def _produce(self, q: queue.Queue, stop: threading.Event) -> None:
        def put(item) -> None:  # gives up once stopped, so close() never waits on a full queue
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return
                except queue.Full:
                    continue

        try:
            while not stop.is_set():
                put((self.source.next_batch(), self.source.state()))
        except BaseException as e:  # handed to the consumer, which raises it in the training loop
            put((_DONE, e))

    def _start(self) -> None:
        self._stop = threading.Event()
        self._queue = queue.Queue(self.depth)
        self._thread = threading.Thread(target=self._produce, args=(self._queue, self._stop), daemon=True,
                                        name="input-prefetch")
        self._thread.start()

    def close(self) -> None:
        """Stop the reading thread; the source goes back to the last batch handed out, so reading
        on continues exactly where the consumer stopped."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread, self._queue = None, None
            self.source.restore(self._state)
            self.source.close()  # its own readers (the parquet input's threads) start again when read

    def next_batch(self):
        if self._thread is None:
            self._start()
        batch, state = self._queue.get()
        if batch is _DONE:
            self.close()
            raise state
        self._state = state
        return batch

    def state(self) -> dict[str, Any]:
        return self._state

    def restore(self, state: dict[str, Any]) -> None:
        self.close()
        self.source.restore(state)
        self._state = self.source.state()

    def reset(self) -> None:
        self.close()
        self.source.reset()
        self._state = self.source.state()

    @property
    def skipped_records(self) -> int:
        return self.source.skipped_records  # counted as read, which may run ahead of the batches handed out
