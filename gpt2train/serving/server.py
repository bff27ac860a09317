"""Putting the server together and running it: engine, scheduler, app, uvicorn.

`ServingServer` binds its socket first (a taken port fails before the model loads), compiles
every program (warm-up), then serves; `start()` runs it in a thread (tests, the benchmark),
`run()` in the foreground until Ctrl-C (the `serve` command).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import threading
from dataclasses import dataclass

import uvicorn

from ..errors import UserError
from ..sampling import SamplingOptions
from .app import Service, build_app
from .engine import Engine
from .metrics import ServerMetrics
from .protocol import IdleClosingH11Protocol
from .requests import Limits
from .scheduler import Scheduler

MAX_DEFAULT_SLOTS = 16


@dataclass
class ServeSettings:
    """The server's limits (the `serve` command's flags)."""
    slots: int | None = None        # None: from memory (default_slots)
    max_tokens: int | None = None   # None: the context
    max_queue: int = 256            # texts waiting for a slot; more get 429
    max_texts: int = 64             # prompts x n in one request; more get 413
    request_timeout: float = 600.0  # seconds from arrival to the last token
    idle_timeout: float = 5.0       # seconds a connection may stay silent (before or between requests)
    send_timeout: float = 60.0      # seconds a streaming client may read nothing
    max_connections: int = 1024     # beyond: 503 (uvicorn's limit_concurrency)
    chunk: int = 4                  # at most this many decode steps between admissions (fewer: ~0.1 s a call)


def slot_bytes(cfg) -> int:
    """Memory one slot holds: its keys and values for the whole context, and its logits."""
    cache = 2 * cfg.n_layer * cfg.n_ctx * cfg.n_embd * (2 if cfg.precision == "bfloat16" else 4)
    return cache + 8 * cfg.padded_vocab


def default_slots(cfg) -> int:
    """As many slots as an eighth of the memory now available holds, from 1 to 16 (beyond 16 a
    CPU's decode step grows about linearly with the slots: no more tokens per second)."""
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        free = 4 << 30
    return max(1, min(MAX_DEFAULT_SLOTS, free // 8 // slot_bytes(cfg)))


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port "
                        f"(0 picks a free one)") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


LOG_CONFIG = {  # uvicorn's lines, all on stderr; no access log colour codes
    "version": 1, "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(message)s"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stderr"}},
    "loggers": {"uvicorn": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
                "uvicorn.error": {"level": "INFO"},
                "uvicorn.access": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
                "gpt2train.serving": {"handlers": ["stderr"], "level": "INFO", "propagate": False}},
}


class ServingServer:
    def __init__(self, cfg, params, tokenizer, defaults: SamplingOptions, *, host: str = "127.0.0.1",
                 port: int = 8000, settings: ServeSettings | None = None, step: int | None = None,
                 model_name: str | None = None, sock: socket.socket | None = None, access_log: bool = True):
        s = self.settings = settings or ServeSettings()
        self.sock = sock or bind(host, port)
        self.host, self.port = self.sock.getsockname()[:2]
        slots = s.slots or default_slots(cfg)
        max_tokens = s.max_tokens or cfg.n_ctx
        self.metrics = ServerMetrics()
        self.engine = Engine(cfg, params, tokenizer.eot_id, slots=slots, chunk=s.chunk)
        self.engine.warm_up()
        self.scheduler = Scheduler(self.engine, tokenizer, max_queue=s.max_queue, metrics=self.metrics)
        name = model_name or os.path.basename(os.path.normpath(cfg.model_path)) or "gpt2"
        defaults = SamplingOptions(**{**defaults.__dict__, "length": min(defaults.length, max_tokens)})
        self.service = Service(self.scheduler, tokenizer, defaults, model_name=name, n_ctx=cfg.n_ctx,
                               n_vocab=cfg.n_vocab, limits=Limits(max_tokens, s.max_texts),
                               request_timeout=s.request_timeout, send_timeout=s.send_timeout, step=step,
                               metrics=self.metrics)
        self.metrics.occupancy(0, 0, slots)
        self.app = build_app(self.service)
        self.uvicorn = uvicorn.Server(uvicorn.Config(
            self.app, http=IdleClosingH11Protocol, lifespan="off", timeout_keep_alive=s.idle_timeout,
            limit_concurrency=s.max_connections, timeout_graceful_shutdown=5, log_config=LOG_CONFIG,
            access_log=access_log))
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def run(self) -> None:
        """Serve in the foreground until Ctrl-C (uvicorn's shutdown, then KeyboardInterrupt)."""
        self.scheduler.start()
        try:
            self.uvicorn.run(sockets=[self.sock])
        finally:
            self.scheduler.stop()
        # uvicorn raises the Ctrl-C it caught again once it has shut down, but asyncio's runner
        # drops it when it lands as the server's task ends (seen under load: exit 0, not 130). The
        # foreground server only returns on a signal, so it ends as Ctrl-C does either way.
        raise KeyboardInterrupt

    def start(self) -> "ServingServer":
        """Serve from a thread; returns once the server answers."""
        self.scheduler.start()
        self._thread = threading.Thread(target=lambda: asyncio.run(self.uvicorn.serve(sockets=[self.sock])),
                                        name="gpt2train-http", daemon=True)
        self._thread.start()
        while not self.uvicorn.started:
            if not self._thread.is_alive():
                raise RuntimeError("the HTTP server did not start")
            threading.Event().wait(0.01)
        return self

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.scheduler.stop()
        self.sock.close()


def print_ready(server: ServingServer, step, model_path: str) -> None:
    url = server.url
    print(f"serving step {step} of {model_path} on {url} with {server.engine.slots} slots "
          f"(POST /v1/completions, GET /v1/models, GET /health, GET /metrics, the playground at /; Ctrl-C stops)\n"
          f"  try: curl -s {url}/v1/completions -H 'Content-Type: application/json' "
          f"-d '{{\"prompt\": \"Hello\", \"max_tokens\": 20}}'", flush=True)
    sys.stdout.flush()
