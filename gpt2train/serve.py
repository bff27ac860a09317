"""Generation over HTTP: `POST /generate` takes JSON, returns the continuations as JSON.

The standard library's threading server; requests for the one model are served in turn (each
generate call already uses every core). Any sampling setting a request leaves out takes the
server's default (its command-line flags); a bad request gets status 400 and an error that
names the problem, and the server keeps running. With "stream": true the reply is JSON lines,
{"row": i, "text": ...} as text is produced, then the whole reply as the last line.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .errors import UserError
from .generate import Generator, generate_batches
from .sampling import SamplingOptions, request_fields

MAX_BODY_BYTES = 1 << 20
MAX_PROMPTS = 256
# The JSON types each kind of option accepts, and their name in an error.
JSON_TYPES = {int: ((int,), "an integer"), float: ((int, float), "a number"), bool: ((bool,), "true or false")}
# Request fields besides the prompt(s): every sampling option (sampling.SamplingOptions).
SETTINGS = {name: JSON_TYPES[kind] for name, kind in request_fields().items()}
USAGE = {"POST /generate": {"prompt": "text (or \"prompts\": [texts])", **{k: t[1] for k, t in SETTINGS.items()},
                            "stream": "true or false: JSON lines as text is produced"},
         "GET /health": "model, step, defaults"}


class BadRequest(Exception):
    """A request the client must change; its message says how."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def parse_request(body: bytes, defaults: SamplingOptions) -> tuple[list[str], SamplingOptions, bool]:
    """JSON body -> (prompts, options, stream); BadRequest names whatever is wrong."""
    try:
        req = json.loads(body)
    except ValueError as e:
        raise BadRequest(f"the body is not JSON ({e}); send e.g. {{\"prompt\": \"Once upon a time\"}}") from None
    if not isinstance(req, dict):
        raise BadRequest("the body must be a JSON object, e.g. {\"prompt\": \"Once upon a time\"}")
    unknown = sorted(set(req) - set(SETTINGS) - {"prompt", "prompts", "stream"})
    if unknown:
        raise BadRequest(f"unknown field(s) {', '.join(unknown)}; known: prompt, prompts, stream, "
                         f"{', '.join(SETTINGS)}")
    stream = req.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest(f"\"stream\" must be true or false, got {json.dumps(stream)}")
    if ("prompt" in req) == ("prompts" in req):
        raise BadRequest("give exactly one of \"prompt\" (a string) and \"prompts\" (a list of strings)")
    prompts = [req["prompt"]] if "prompt" in req else req["prompts"]
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise BadRequest("\"prompt\" must be a string and \"prompts\" a list of strings")
    if not 1 <= len(prompts) <= MAX_PROMPTS:
        raise BadRequest(f"send 1 to {MAX_PROMPTS} prompts per request, not {len(prompts)}")
    settings = {}
    for key, (types, kind) in SETTINGS.items():
        if key in req:
            value = req[key]
            if isinstance(value, bool) != (types == (bool,)) or not isinstance(value, types):
                raise BadRequest(f"\"{key}\" must be {kind}, got {json.dumps(value)}")
            settings[key] = value
    try:
        opts = dataclasses.replace(defaults, **settings).check()
    except UserError as e:
        raise BadRequest(str(e)) from None
    return prompts, opts, stream


class GenerationService:
    """The model behind the API: one Generator, used by one request at a time."""

    def __init__(self, gen: Generator, defaults: SamplingOptions, *, batch_size: int, step: int | None = None):
        self.gen, self.defaults, self.batch_size, self.step = gen, defaults, max(1, batch_size), step
        self._lock = threading.Lock()

    def health(self) -> dict:
        return {"status": "ok", "step": self.step, "n_ctx": self.gen.cfg.n_ctx,
                "defaults": dataclasses.asdict(self.defaults)}

    def generate(self, prompts: list[str], opts: SamplingOptions, on_text=None) -> dict:
        """The reply to one request; on_text(row, new_text) is called as text is produced."""
        start = time.perf_counter()
        texts, caught = [], set()
        with self._lock:  # batches of batch_size rows, each with its own seed, as the command line does
            for batch in generate_batches(self.gen, prompts, opts, self.batch_size, on_text=on_text):
                texts += batch.texts
                caught.update(batch.warnings)
        return {"completions": texts, "warnings": sorted(caught),
                "seconds": round(time.perf_counter() - start, 3), "step": self.step}


class Handler(BaseHTTPRequestHandler):
    """JSON in, JSON out; the model is the server's `service` (see make_server)."""
    server_version = "gpt2train"

    def _reply(self, status: int, payload: dict) -> None:
        data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _stream(self, prompts, opts) -> None:
        """JSON lines, flushed as text arrives; the connection's end marks the reply's end."""
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson; charset=utf-8")
        self.end_headers()

        def line(payload: dict) -> None:
            self.wfile.write(json.dumps(payload, ensure_ascii=False).encode("utf-8") + b"\n")
            self.wfile.flush()
        try:
            line(self.server.service.generate(prompts, opts, on_text=lambda i, text: line({"row": i, "text": text})))
        except (BrokenPipeError, ConnectionResetError):  # the client left: stop generating for it
            self.log_error("the client closed the connection; generation stopped")
        except Exception as e:  # the status is sent: the last line carries the failure
            self.log_error("generation failed: %r", e)
            line({"error": f"generation failed: {type(e).__name__}: {e}"})

    def do_GET(self):  # noqa: N802 (the standard library's name)
        if self.path in ("/health", "/"):
            self._reply(200, {**self.server.service.health(), "usage": USAGE})
        else:
            self._reply(404, {"error": f"no such path {self.path}; use POST /generate or GET /health"})

    def do_POST(self):  # noqa: N802
        if self.path != "/generate":
            self._reply(404, {"error": f"no such path {self.path}; use POST /generate"})
            return
        try:
            size = self.headers.get("Content-Length") or "0"
            if not size.isdigit():
                raise BadRequest(f"Content-Length must be a number of bytes, got {size!r}")
            size = int(size)
            if size > MAX_BODY_BYTES:
                raise BadRequest(f"the body is {size} bytes; the limit is {MAX_BODY_BYTES}", status=413)
            prompts, opts, stream = parse_request(self.rfile.read(size), self.server.service.defaults)
            if stream:
                self._stream(prompts, opts)
            else:
                self._reply(200, self.server.service.generate(prompts, opts))
        except BadRequest as e:
            self._reply(e.status, {"error": str(e)})
        except Exception as e:  # the server stays up; the client learns what happened
            self.log_error("generation failed: %r", e)
            self._reply(500, {"error": f"generation failed: {type(e).__name__}: {e}"})


def make_server(host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """A server bound to host:port (before the model loads, so a taken port fails at once);
    set its `service` before serving."""
    try:
        server = ThreadingHTTPServer((host, port), Handler)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port "
                        f"(0 picks a free one)") from None
    server.daemon_threads = True
    return server
