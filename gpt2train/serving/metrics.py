"""The server's Prometheus metrics (GET /metrics): requests, tokens, queue, slots, latencies.

Each server has its own registry, so several servers in one process (tests) count apart.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the app)

# Buckets in seconds: a first token waits for the decode call in progress and its prefill (tens of
# ms for a tiny model, up to a second for 124M with 16 clients on a busy CPU); a token between calls takes ms to 100s of ms.
FIRST_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2)


class ServerMetrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("gpt2train_requests", "HTTP requests answered, by path and status",
                                ["path", "status"], registry=r)
        self.prompt_tokens = Counter("gpt2train_prompt_tokens", "prompt tokens run through the model", registry=r)
        self.generated_tokens = Counter("gpt2train_generated_tokens", "tokens produced", registry=r)
        self.texts = Counter("gpt2train_texts_finished", "texts finished, by reason", ["reason"], registry=r)
        self.queue = Gauge("gpt2train_queue_depth", "texts waiting for a slot", registry=r)
        self.busy = Gauge("gpt2train_slots_busy", "decode slots holding a text", registry=r)
        self.slots = Gauge("gpt2train_slots", "decode slots", registry=r)
        self.programs = Gauge("gpt2train_compiled_programs", "programs compiled (fixed after warm-up)", registry=r)
        self.ttft = Histogram("gpt2train_time_to_first_token_seconds", "from arrival to the first token",
                              buckets=FIRST_TOKEN_BUCKETS, registry=r)
        self.per_token = Histogram("gpt2train_time_per_token_seconds", "between a text's tokens",
                                   buckets=TOKEN_BUCKETS, registry=r)

    # called by the scheduler thread and the app
    def request(self, path: str, status: int) -> None:
        self.requests.labels(path, str(status)).inc()

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def tokens(self, count: int, seconds_each: float) -> None:
        self.generated_tokens.inc(count)
        for _ in range(count):
            self.per_token.observe(seconds_each)

    def finished(self, reason: str) -> None:
        self.texts.labels(reason).inc()

    def failed(self, status: int) -> None:
        self.texts.labels("error").inc()

    def occupancy(self, waiting: int, busy: int, slots: int) -> None:
        self.queue.set(waiting)
        self.busy.set(busy)
        self.slots.set(slots)

    def render(self) -> bytes:
        return generate_latest(self.registry)
