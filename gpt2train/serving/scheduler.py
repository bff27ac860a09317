"""Continuous batching: a thread that admits waiting texts into free decode slots between steps.

A request becomes a `Job` of one or more `Choice`s (a prompt, or a prompt's n samples); each
choice takes a slot when one is free: its prompt is run through the model (prefill, several
waiting prompts of a length bucket in one call), which draws its first token, and from the next
step on it decodes with the running batch. A slot is freed the moment its text ends (its
length, <|endoftext|>, a stop string), its client leaves, or its time runs out.

The thread never waits for a client: what a choice produces goes into its job's `Outbox`, a
buffer of its own that the HTTP side drains at the client's pace (it holds at most the
request's own tokens), so a slow reader slows no one else.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from ..sampling import SamplingOptions
from .engine import Admission, Engine, TOP_LOGPROBS

log = logging.getLogger("gpt2train.serving")


class QueueFull(Exception):
    """More texts are waiting than the server takes (the client should retry later)."""


@dataclass
class Delta:
    """New text of one choice, with the tokens that made it (tokens may run ahead of text)."""
    choice: int
    text: str
    tokens: list[int]
    logprobs: list[float]
    top: list[list[tuple[int, float]]]


@dataclass
class Finished:
    choice: int
    reason: str  # "stop" (<|endoftext|> or a stop string) or "length"
    text: str    # the whole text
    prompt_logprobs: list[float] | None = None


@dataclass
class Failed:
    message: str
    status: int = 500


class Outbox:
    """A job's events, written by the scheduler thread and read by one asyncio task."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None):
        self._items: collections.deque = collections.deque()
        self._loop = loop
        self._ready = asyncio.Event() if loop is not None else None
        self._lock = threading.Lock()
        self._sync = threading.Condition(self._lock)

    def put(self, item) -> None:
        with self._lock:
            self._items.append(item)
            self._sync.notify_all()
        if self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._ready.set)
            except RuntimeError:  # the loop closed meanwhile: nobody reads this job any more
                pass

    def drain(self) -> list:
        with self._lock:
            items = list(self._items)
            self._items.clear()
            if self._ready is not None:
                self._ready.clear()
        return items

    async def wait(self) -> list:
        """Whatever arrived, waiting until something has."""
        while True:
            items = self.drain()
            if items:
                return items
            await self._ready.wait()

    def wait_sync(self, timeout: float | None = None) -> list:
        with self._lock:
            if not self._items:
                self._sync.wait(timeout)
        return self.drain()


@dataclass
class Choice:
    job: "Job"
    index: int
    prompt: list[int]
    opts: SamplingOptions
    stop: tuple[str, ...] = ()
    # filled in as it runs
    tokens: list[int] = field(default_factory=list)
    sent: str = ""
    sent_tokens: int = 0
    logprobs: list[float] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)
    prompt_logprobs: list[float] | None = None
    last_time: float = 0.0
    finished: bool = False
    final_text: str = ""


@dataclass
class Job:
    """One request: its choices and the outbox their text goes to."""
    choices: list[Choice]
    outbox: Outbox
    timeout: float
    want_prompt_logprobs: bool = False
    arrived: float = field(default_factory=time.monotonic)
    cancelled: threading.Event = field(default_factory=threading.Event)
    first_token: float | None = None

    def cancel(self) -> None:
        """The client has gone: the scheduler frees its slots before the next step."""
        self.cancelled.set()


class Scheduler:
    """Owns the engine; `submit` queues a job, the thread runs the batch."""

    def __init__(self, engine: Engine, tokenizer, *, max_queue: int, metrics=None):
        self.engine, self.tok, self.max_queue, self.metrics = engine, tokenizer, max_queue, metrics
        self._waiting: collections.deque[Choice] = collections.deque()
        self._running: dict[int, Choice] = {}
        self._free = list(range(engine.slots))
        self._lock = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="gpt2train-scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def queue_depth(self) -> int:
        return len(self._waiting)

    def busy_slots(self) -> int:
        return len(self._running)

    def submit(self, job: Job) -> None:
        """Queue every choice of `job`, or none of them (QueueFull) when the queue cannot hold them."""
        with self._lock:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) + len(job.choices) > self.max_queue:
                raise QueueFull(f"{len(self._waiting)} texts are waiting and the queue holds {self.max_queue}; "
                                f"retry shortly")
            self._waiting.extend(job.choices)
            self._lock.notify_all()
        self._observe()

    # -------------------------------------------------------------- the thread
    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self._waiting and not self._running:
                    self._lock.wait()
                if self._stopping:
                    break
            try:
                self._admit_waiting()
                self._drop_gone()
                if self._running:
                    self._step()
            except Exception as e:  # the model failed: fail the jobs in flight, keep serving
                log.exception("decoding failed")
                for choice in list(self._running.values()):
                    self._fail(choice.job, f"generation failed: {type(e).__name__}: {e}")
        for choice in list(self._running.values()) + list(self._waiting):
            self._fail(choice.job, "the server is shutting down", status=503)

    def _admit_waiting(self) -> int:
        """Place waiting texts in free slots, a prefill call's worth at a time; how many were placed."""
        admitted = 0
        while self._free:
            batch = self._next_prefill()
            if not batch:
                break
            slots = [self._free.pop() for _ in batch]
            try:
                first, prompt_lps = self.engine.admit(slots, [Admission(c.prompt, c.opts, c.opts.length,
                                                                        prompt_logprobs=c.job.want_prompt_logprobs)
                                                              for c in batch])
            except Exception as e:  # the slots stay free; the texts fail (not left waiting forever)
                self._free.extend(slots)
                for choice in batch:
                    self._fail(choice.job, f"generation failed: {type(e).__name__}: {e}")
                raise
            for slot, choice, prompt_lp in zip(slots, batch, prompt_lps):
                if prompt_lp is not None:
                    choice.prompt_logprobs = [float(x) for x in prompt_lp]
                self._running[slot] = choice
            self._observe()
            # The first tokens go out now, before the other waiting prompts' prefills.
            self._deliver(first, [(row, slot, choice) for row, (slot, choice) in enumerate(zip(slots, batch))])
            admitted += len(batch)
        return admitted

    def _next_prefill(self) -> list[Choice]:
        """The oldest waiting text, and after it the next ones (in arrival order) that run through
        the same prefill program -- the same prompt bucket and echo setting -- as many as that
        program's rows and the free slots take. A text whose client left is dropped on the way;
        one out of time fails."""
        batch, passed, late, key, rows = [], [], [], None, 0
        with self._lock:
            while self._waiting and (key is None or len(batch) < rows):
                choice = self._waiting.popleft()
                if choice.job.cancelled.is_set() or choice.finished:
                    self._finish_quietly(choice)
                elif self._expired(choice.job):
                    late.append(choice)
                else:
                    mine = (self.engine.bucket(len(choice.prompt)), choice.job.want_prompt_logprobs)
                    if key is None:
                        key, rows = mine, min(self.engine.prefill_rows(mine[0]), len(self._free))
                    (batch if mine == key else passed).append(choice)
            self._waiting.extendleft(reversed(passed))  # the ones passed over keep their places
        for choice in late:
            if not choice.job.cancelled.is_set():
                self._fail(choice.job, f"the request took longer than its {choice.job.timeout:g} s limit", status=503)
        return batch

    def _expired(self, job: Job) -> bool:
        return time.monotonic() - job.arrived > job.timeout

    def _drop_gone(self) -> None:
        """Free the slots (and queue places) of jobs whose client left or whose time ran out."""
        with self._lock:
            gone = [c for c in self._waiting if c.job.cancelled.is_set() or self._expired(c.job)]
            if gone:
                ids = {id(c) for c in gone}
                self._waiting = collections.deque(c for c in self._waiting if id(c) not in ids)
        for choice in gone:
            if not choice.job.cancelled.is_set():
                self._fail(choice.job, f"the request took longer than its {choice.job.timeout:g} s limit", status=503)
        for slot, choice in list(self._running.items()):
            job = choice.job
            if job.cancelled.is_set():
                self._release(slot)
                self._finish_quietly(choice)
            elif self._expired(job):
                self._fail(job, f"the request took longer than its {job.timeout:g} s limit", status=503)

    def _release(self, slot: int) -> None:
        self.engine.free(slot)
        del self._running[slot]
        self._free.append(slot)
        self._observe()

    def _finish_quietly(self, choice: Choice) -> None:
        if not choice.finished and self.metrics is not None:
            self.metrics.finished("cancelled")
        choice.finished = True

    def _fail(self, job: Job, message: str, status: int = 500) -> None:
        if job.cancelled.is_set() and all(c.finished for c in job.choices):
            return
        job.cancel()
        for slot, choice in list(self._running.items()):
            if choice.job is job:
                self._release(slot)
        for choice in job.choices:
            choice.finished = True
        job.outbox.put(Failed(message, status))
        if self.metrics is not None:
            self.metrics.failed(status)

    def _step(self, n: int | None = None) -> None:
        steps = self.engine.step(n)
        self._deliver(steps, [(slot, slot, choice) for slot, choice in list(self._running.items())])

    def _deliver(self, steps, rows: list[tuple[int, int, "Choice"]]) -> None:
        """Hand each (row of `steps`, slot, choice)'s new tokens to its job; free the slots whose text ended."""
        now = time.monotonic()
        eot = self.engine.eot
        for row, slot, choice in rows:
            new = []
            reason = None
            for j in range(steps.tokens.shape[1]):
                if len(choice.tokens) + len(new) >= choice.opts.length:
                    break
                if not steps.live[row, j]:
                    if steps.tokens[row, j] == eot and choice.opts.stop_at_eot:
                        reason = "stop"
                    break
                new.append(j)
            if len(choice.tokens) + len(new) >= choice.opts.length and reason is None:
                reason = "length"
            for j in new:
                choice.tokens.append(int(steps.tokens[row, j]))
                choice.logprobs.append(float(steps.logprobs[row, j]))
                choice.top.append([(int(t), float(lp)) for t, lp in
                                   zip(steps.top_tokens[row, j, :TOP_LOGPROBS], steps.top_logprobs[row, j])])
            job = choice.job
            if new:
                if self.metrics is not None:
                    if choice.last_time:  # time since the text's last tokens
                        self.metrics.tokens(len(new), (now - choice.last_time) / len(new))
                    else:  # its first token (from the prefill): timed by the first-token metric
                        self.metrics.generated_tokens.inc(len(new))
                if job.first_token is None:
                    job.first_token = now
                    if self.metrics is not None:
                        self.metrics.first_token(now - job.arrived)
                choice.last_time = now
            reason = self._emit(choice, reason)
            if reason is not None:
                self._release(slot)
                self._done(choice, reason)

    def _emit(self, choice: Choice, reason: str | None) -> str | None:
        """Send the text that can no longer change; a stop string ends the text before it."""
        text = self.tok.decode(choice.tokens)
        cut = min((i for i in (text.find(s) for s in choice.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, reason = text[:cut], "stop"
            ready = text
        elif reason is not None:
            ready = text
        else:
            ready = text.rstrip("\ufffd")  # a character split across tokens waits for its end
            hold = max((k for s in choice.stop for k in range(1, len(s)) if ready.endswith(s[:k])), default=0)
            ready = ready[:len(ready) - hold]  # text that may begin a stop string waits too
        if len(ready) > len(choice.sent) or len(choice.tokens) > choice.sent_tokens:
            delta = ready[len(choice.sent):] if ready.startswith(choice.sent) else ""
            span = slice(choice.sent_tokens, len(choice.tokens))
            choice.job.outbox.put(Delta(choice.index, delta, choice.tokens[span], choice.logprobs[span],
                                        choice.top[span]))
            choice.sent = choice.sent + delta
            choice.sent_tokens = len(choice.tokens)
        if reason is not None:
            choice.final_text = text
        return reason

    def _done(self, choice: Choice, reason: str) -> None:
        choice.finished = True
        choice.job.outbox.put(Finished(choice.index, reason, choice.final_text, choice.prompt_logprobs))
        if self.metrics is not None:
            self.metrics.finished(reason)

    def _observe(self) -> None:
        if self.metrics is not None:
            self.metrics.occupancy(len(self._waiting), len(self._running), self.engine.slots)
