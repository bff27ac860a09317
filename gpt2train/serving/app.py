"""The HTTP API (Starlette): OpenAI's completions, models and health, Prometheus metrics, the
playground page, and the older `POST /generate`.

Handlers never run the model: they check a request, hand a Job to the scheduler and relay its
outbox to the client, as JSON or as server-sent events. A client that leaves cancels its job
(its slots are free before the next decode step); one that stops reading holds only its own
buffer; a vanished client is no error and leaves no traceback in the log.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import asdict
from importlib import resources

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from ..sampling import SamplingOptions
from .metrics import CONTENT_TYPE_LATEST, ServerMetrics
from .requests import MAX_BODY_BYTES, ApiError, CompletionRequest, Limits, parse_completion
from .scheduler import Choice, Delta, Failed, Finished, Job, Outbox, QueueFull, Scheduler

log = logging.getLogger("gpt2train.serving")


class Service:
    """What the handlers share: the scheduler, the model's name and limits, the defaults."""

    def __init__(self, scheduler: Scheduler, tokenizer, defaults: SamplingOptions, *, model_name: str, n_ctx: int,
                 n_vocab: int, limits: Limits, request_timeout: float, send_timeout: float, step: int | None,
                 metrics: ServerMetrics):
        self.scheduler, self.tok, self.defaults = scheduler, tokenizer, defaults
        self.model_name, self.n_ctx, self.n_vocab, self.limits = model_name, n_ctx, n_vocab, limits
        self.request_timeout, self.send_timeout, self.step, self.metrics = request_timeout, send_timeout, step, metrics
        self.started = int(time.time())

    def parse(self, body) -> CompletionRequest:
        return parse_completion(body, self.defaults, self.tok, n_ctx=self.n_ctx, n_vocab=self.n_vocab,
                                limits=self.limits, model_names=(self.model_name,))

    def job(self, req: CompletionRequest) -> Job:
        job = Job([], Outbox(asyncio.get_running_loop()), self.request_timeout,
                  want_prompt_logprobs=req.echo and req.logprobs is not None)
        for p, ids in enumerate(req.prompts):
            for j in range(req.n):
                index = p * req.n + j
                job.choices.append(Choice(job, index, ids, req.choice_options(index), req.stop))
        try:
            self.scheduler.submit(job)
        except QueueFull as e:
            raise ApiError(429 if self.scheduler.alive else 503, str(e), kind="rate_limit_error") from None
        self.metrics.prompt_tokens.inc(sum(len(ids) for ids in req.prompts) * req.n)
        return job


# ----------------------------------------------------------------------------- helpers
def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


async def read_json(request: Request, timeout: float):
    """The body as JSON, within MAX_BODY_BYTES and `timeout` seconds."""
    size = request.headers.get("content-length")
    if size is not None and (not size.isdigit() or int(size) > MAX_BODY_BYTES):
        raise ApiError(413, f"the body is {size} bytes; the limit is {MAX_BODY_BYTES}")
    body = bytearray()

    async def read():
        async for piece in request.stream():
            body.extend(piece)
            if len(body) > MAX_BODY_BYTES:
                raise ApiError(413, f"the body is over the {MAX_BODY_BYTES}-byte limit")
    try:
        await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        raise ApiError(408, f"the body did not arrive within {timeout:g} s") from None
    try:
        return json.loads(body)
    except ValueError as e:
        raise ApiError(400, f"the body is not JSON ({e}); send e.g. {{\"prompt\": \"Hello\", \"max_tokens\": 16}}") \
            from None


async def wait_for_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class Collected:
    """A job's events gathered into whole choices (for the replies that are not streamed)."""

    def __init__(self, count: int):
        self.text = [""] * count
        self.tokens = [[] for _ in range(count)]
        self.logprobs = [[] for _ in range(count)]
        self.top = [[] for _ in range(count)]
        self.finish = [None] * count
        self.prompt_logprobs = [None] * count
        self.failure: Failed | None = None

    def add(self, event) -> None:
        if isinstance(event, Delta):
            i = event.choice
            self.tokens[i] += event.tokens
            self.logprobs[i] += event.logprobs
            self.top[i] += event.top
        elif isinstance(event, Finished):
            self.text[event.choice] = event.text
            self.finish[event.choice] = event.reason
            self.prompt_logprobs[event.choice] = event.prompt_logprobs
        elif isinstance(event, Failed):
            self.failure = event

    @property
    def complete(self) -> bool:
        return self.failure is not None or all(f is not None for f in self.finish)


async def collect(job: Job, receive) -> Collected:
    """Wait for every choice of `job`; a client that disconnects meanwhile cancels it."""
    got = Collected(len(job.choices))
    gone = asyncio.ensure_future(wait_for_disconnect(receive))
    try:
        while not got.complete:
            waiting = asyncio.ensure_future(job.outbox.wait())
            await asyncio.wait({waiting, gone}, return_when=asyncio.FIRST_COMPLETED)
            if gone.done():
                waiting.cancel()
                job.cancel()
                raise ClientDisconnect()
            for event in waiting.result():
                got.add(event)
        return got
    finally:
        gone.cancel()


def logprobs_block(tok, tokens, logprobs, top, count: int, offset: int, prompt=None, prompt_lp=None) -> dict:
    """OpenAI's legacy logprobs: each token's text, logprob, top `count` alternatives, text offset."""
    texts, lps, tops = [], [], []
    if prompt is not None:
        texts += [tok.decode([t]) for t in prompt]
        lps += [None] + list(prompt_lp or [None] * (len(prompt) - 1))
        tops += [None] * len(prompt)
    texts += [tok.decode([t]) for t in tokens]
    lps += list(logprobs)
    tops += [{tok.decode([t]): lp for t, lp in alts[:count]} for alts in top]
    offsets, at = [], offset
    for text in texts:
        offsets.append(at)
        at += len(text)
    return {"tokens": texts, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def trim_to_text(tok, tokens, text: str) -> int:
    """How many of `tokens` begin within `text` (a stop string cuts the text inside the tokens)."""
    at = 0
    for i, t in enumerate(tokens):
        if at >= len(text):
            return i
        at += len(tok.decode([t]))
    return len(tokens)


# ----------------------------------------------------------------------------- endpoints
def build_app(service: Service) -> Starlette:
    tok, metrics = service.tok, service.metrics

    def reply(path: str, body, status: int = 200) -> JSONResponse:
        metrics.request(path, status)
        return JSONResponse(body, status_code=status)

    def fail(path: str, e: ApiError) -> JSONResponse:
        metrics.request(path, e.status)
        return error_response(e)

    def completion_head(req_id: str) -> dict:
        return {"id": req_id, "object": "text_completion", "created": int(time.time()), "model": service.model_name}

    async def completions(request: Request):
        path = "/v1/completions"
        try:
            req = service.parse(await read_json(request, service.request_timeout))
            job = service.job(req)
        except ApiError as e:
            return fail(path, e)
        except ClientDisconnect:
            return Response(status_code=499)
        req_id = "cmpl-" + uuid.uuid4().hex[:24]
        if req.stream:
            metrics.request(path, 200)
            return EventStream(job, req, service, completion_head(req_id))
        try:
            got = await collect(job, request.receive)
        except ClientDisconnect:
            return Response(status_code=499)
        if got.failure is not None:
            return fail(path, ApiError(got.failure.status, got.failure.message, kind="server_error"))
        choices, completion_tokens = [], 0
        for i, choice in enumerate(job.choices):
            prompt_text = req.prompt_texts[i // req.n]
            kept = trim_to_text(tok, got.tokens[i], got.text[i])
            completion_tokens += len(got.tokens[i])
            text = (prompt_text if req.echo else "") + got.text[i]
            block = None
            if req.logprobs is not None:
                block = logprobs_block(tok, got.tokens[i][:kept], got.logprobs[i][:kept], got.top[i][:kept],
                                       req.logprobs, 0, choice.prompt if req.echo else None, got.prompt_logprobs[i])
            choices.append({"text": text, "index": i, "logprobs": block, "finish_reason": got.finish[i]})
        prompt_tokens = sum(len(ids) for ids in req.prompts) * req.n
        return reply(path, {**completion_head(req_id), "choices": choices,
                            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                      "total_tokens": prompt_tokens + completion_tokens}})

    async def models(request: Request):
        return reply("/v1/models", {"object": "list", "data": [
            {"id": service.model_name, "object": "model", "created": service.started, "owned_by": "gpt2train"}]})

    async def health(request: Request):
        alive = service.scheduler.alive
        body = {"status": "ok" if alive else "stopped", "model": service.model_name, "step": service.step,
                "n_ctx": service.n_ctx, "slots": service.scheduler.engine.slots,
                "busy_slots": service.scheduler.busy_slots(), "queue": service.scheduler.queue_depth(),
                "limits": {"max_tokens": service.limits.max_tokens, "max_texts_per_request": service.limits.max_choices,
                           "queue": service.scheduler.max_queue},
                "defaults": asdict(service.defaults)}
        return reply("/health", body, 200 if alive else 503)

    async def metrics_page(request: Request):
        metrics.programs.set(service.scheduler.engine.compiled_programs())
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def playground(request: Request):
        page = resources.files("gpt2train.serving").joinpath("static/playground.html").read_text(encoding="utf-8")
        return HTMLResponse(page.replace("{{MODEL}}", service.model_name))

    async def generate(request: Request):
        """The older API: {"prompt" | "prompts", "length", ...} -> {"completions": [...]}, or JSON
        lines {"row", "text"} then the whole reply with "stream": true."""
        path = "/generate"
        start = time.perf_counter()
        try:
            body = await read_json(request, service.request_timeout)
            if not isinstance(body, dict):
                raise ApiError(400, "the body must be a JSON object, e.g. {\"prompt\": \"Once upon a time\"}")
            if ("prompt" in body) == ("prompts" in body):
                raise ApiError(400, "give exactly one of \"prompt\" (a string) and \"prompts\" (a list of strings)")
            prompts = [body.pop("prompt")] if "prompt" in body else body.pop("prompts")
            if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
                raise ApiError(400, "\"prompt\" must be a string and \"prompts\" a list of strings", "prompt")
            stream = body.pop("stream", False)
            if "length" in body:
                body["max_tokens"] = body.pop("length")
            if any(k not in service.defaults.__dataclass_fields__ and k != "max_tokens" for k in body):
                unknown = next(k for k in body if k not in service.defaults.__dataclass_fields__ and k != "max_tokens")
                raise ApiError(400, f"unknown field '{unknown}'; known: prompt, prompts, stream, "
                                    f"{', '.join(service.defaults.__dataclass_fields__)}", unknown)
            req = service.parse({**body, "prompt": prompts, "stream": stream})
            job = service.job(req)
        except ApiError as e:
            metrics.request(path, e.status)
            return JSONResponse({"error": e.message}, status_code=e.status)
        except ClientDisconnect:
            return Response(status_code=499)
        if req.stream:
            metrics.request(path, 200)
            return JsonLines(job, service, start)
        try:
            got = await collect(job, request.receive)
        except ClientDisconnect:
            return Response(status_code=499)
        if got.failure is not None:
            metrics.request(path, got.failure.status)
            return JSONResponse({"error": got.failure.message}, status_code=got.failure.status)
        return reply(path, {"completions": got.text, "warnings": [],
                            "seconds": round(time.perf_counter() - start, 3), "step": service.step})

    routes = [Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]),
              Route("/health", health, methods=["GET"]),
              Route("/metrics", metrics_page, methods=["GET"]),
              Route("/", playground, methods=["GET"]),
              Route("/generate", generate, methods=["POST"])]

    async def not_found(request: Request, exc):
        status = getattr(exc, "status_code", 404)
        message = (f"no such path {request.url.path}; the API is POST /v1/completions, GET /v1/models, GET /health, "
                   f"GET /metrics, GET / (the playground), POST /generate")
        if status == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        return JSONResponse(ApiError(status, message).body(), status_code=status)

    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})


# ----------------------------------------------------------------------------- streaming
class _Stream:
    """A streamed reply written straight to ASGI: each write waits at most send_timeout for a
    client that stopped reading (then the connection is dropped), and a disconnect cancels the job."""
    media_type = "text/event-stream"

    def __init__(self, job: Job, service: Service):
        self.job, self.service = job, service

    async def __call__(self, scope, receive, send) -> None:
        gone = asyncio.ensure_future(wait_for_disconnect(receive))
        try:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", f"{self.media_type}; charset=utf-8".encode()),
                                    (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]})
            async for data in self.pieces():
                if gone.done():
                    return
                sending = asyncio.ensure_future(send({"type": "http.response.body", "body": data, "more_body": True}))
                await asyncio.wait({sending, gone}, timeout=self.service.send_timeout,
                                   return_when=asyncio.FIRST_COMPLETED)
                if not sending.done():  # the client left, or stopped reading: stop its text
                    sending.cancel()
                    if not gone.done():
                        log.warning("a streaming client read nothing for %g s; its request was cancelled",
                                    self.service.send_timeout)
                    return
                if sending.exception() is not None:  # the connection is gone
                    return
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client vanished mid-write: nothing to report
            pass
        finally:
            gone.cancel()
            self.job.cancel()  # frees its slots if it is still running (no-op when finished)

    async def pieces(self):
        raise NotImplementedError


class EventStream(_Stream):
    """OpenAI's streamed completions: `data: {...}` per piece of text, then `data: [DONE]`."""

    def __init__(self, job: Job, req: CompletionRequest, service: Service, head: dict):
        super().__init__(job, service)
        self.req, self.head = req, head

    def event(self, index: int, text: str, finish=None, logprobs=None) -> bytes:
        body = {**self.head, "choices": [{"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish}]}
        return b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n"

    async def pieces(self):
        req, tok = self.req, self.service.tok
        offsets = [0] * len(self.job.choices)
        if req.echo:
            for i, choice in enumerate(self.job.choices):
                offsets[i] = len(req.prompt_texts[i // req.n])
                yield self.event(i, req.prompt_texts[i // req.n])
        sent_text = [""] * len(self.job.choices)
        remaining = len(self.job.choices)
        while remaining:
            for ev in await self.job.outbox.wait():
                if isinstance(ev, Failed):
                    err = ApiError(ev.status, ev.message, kind="server_error").body()
                    yield b"data: " + json.dumps(err).encode() + b"\n\n"
                    remaining = 0
                    break
                if isinstance(ev, Delta):
                    block = None
                    if req.logprobs is not None:
                        block = logprobs_block(tok, ev.tokens, ev.logprobs, ev.top, req.logprobs, offsets[ev.choice])
                    offsets[ev.choice] += len(ev.text)
                    sent_text[ev.choice] += ev.text
                    if ev.text or block:
                        yield self.event(ev.choice, ev.text, logprobs=block)
                elif isinstance(ev, Finished):
                    tail = ev.text[len(sent_text[ev.choice]):]
                    yield self.event(ev.choice, tail, finish=ev.reason)
                    remaining -= 1
        yield b"data: [DONE]\n\n"


class JsonLines(_Stream):
    """POST /generate's stream: {"row": i, "text": ...} lines, then the whole reply."""
    media_type = "application/x-ndjson"

    def __init__(self, job: Job, service: Service, start: float):
        super().__init__(job, service)
        self.start = start

    async def pieces(self):
        got = Collected(len(self.job.choices))
        sent = [""] * len(self.job.choices)
        while not got.complete:
            for ev in await self.job.outbox.wait():
                got.add(ev)
                text = ev.text if isinstance(ev, Delta) else ev.text[len(sent[ev.choice]):] \
                    if isinstance(ev, Finished) else ""
                if text:
                    sent[ev.choice] += text
                    yield json.dumps({"row": ev.choice, "text": text}, ensure_ascii=False).encode() + b"\n"
        if got.failure is not None:
            yield json.dumps({"error": got.failure.message}).encode() + b"\n"
            return
        yield json.dumps({"completions": got.text, "warnings": [], "seconds": round(time.perf_counter() - self.start, 3),
                          "step": self.service.step}, ensure_ascii=False).encode() + b"\n"
