"""Reading an OpenAI completions request: every field checked, every mistake named.

`parse_completion` turns a JSON body into a `CompletionRequest` or raises `ApiError`, which
carries the HTTP status and OpenAI's error shape ({"error": {"message", "type", "param",
"code"}}). The sampling fields come from sampling.SamplingOptions (one declaration for the
command line and the server); `max_tokens` is the option `length`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..errors import UserError
from ..sampling import SamplingOptions, request_fields

MAX_STOPS = 4        # OpenAI's limit on stop strings
MAX_LOGPROBS = 5     # and on alternatives per token
MAX_BODY_BYTES = 1 << 20

# Sampling options a request names as in OpenAI's API (the rest keep their own names).
RENAMED = {"length": "max_tokens"}
SAMPLING_FIELDS = {RENAMED.get(name, name): (name, kind) for name, kind in request_fields().items()}
# OpenAI fields taken only at their neutral value (the model has no such feature).
NEUTRAL = {"presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "suffix": ("",), "logit_bias": ({},)}
OTHER_FIELDS = {"model", "prompt", "n", "stop", "stream", "logprobs", "echo", "user", "best_of", "stream_options"}
KNOWN = set(SAMPLING_FIELDS) | set(NEUTRAL) | OTHER_FIELDS


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Limits:
    """What the server takes: --max_tokens, the largest n times prompts, the queue."""
    max_tokens: int
    max_choices: int


@dataclass
class CompletionRequest:
    prompts: list[list[int]]   # token ids of each prompt
    prompt_texts: list[str]
    opts: SamplingOptions      # length = max_tokens
    n: int
    stop: tuple[str, ...]
    stream: bool
    logprobs: int | None
    echo: bool

    def choice_options(self, index: int) -> SamplingOptions:
        """Choice `index`'s options: the seed moved by its index, so a request's n samples differ
        and each one is reproducible on its own."""
        return self.opts.with_seed_offset(index)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _type_error(name: str, want: str, value) -> ApiError:
    return ApiError(400, f"'{name}' must be {want}, got {value!r}", name)


def _prompts(value, tok, n_vocab: int) -> tuple[list[list[int]], list[str]]:
    """A string, a list of strings, a list of token ids, or a list of lists of token ids."""
    def ids_ok(ids) -> bool:
        return isinstance(ids, list) and ids and all(_is_int(t) and 0 <= t < n_vocab for t in ids)

    if value is None:
        value = ""
    if isinstance(value, str):
        items = [value]
    elif isinstance(value, list) and value and all(isinstance(p, str) for p in value):
        items = value
    elif ids_ok(value):
        items = [value]
    elif isinstance(value, list) and value and all(ids_ok(p) for p in value):
        items = value
    else:
        raise ApiError(400, "'prompt' must be a string, a list of strings, or token ids (a list of integers "
                            f"below {n_vocab}, or a list of such lists)", "prompt")
    ids, texts = [], []
    for item in items:
        if isinstance(item, str):
            encoded = tok.encode(item) if item else []
            ids.append(encoded or [tok.eot_id])  # no prompt: start at a document boundary
            texts.append(item)
        else:
            ids.append(list(item))
            texts.append(tok.decode(item))
    return ids, texts


def parse_completion(req, defaults: SamplingOptions, tok, *, n_ctx: int, n_vocab: int, limits: Limits,
                     model_names: tuple[str, ...]) -> CompletionRequest:
    if not isinstance(req, dict):
        raise ApiError(400, "the body must be a JSON object, e.g. {\"prompt\": \"Hello\", \"max_tokens\": 16}")
    unknown = sorted(set(req) - KNOWN)
    if unknown:
        raise ApiError(400, f"unknown field '{unknown[0]}'; this server takes: {', '.join(sorted(KNOWN))}", unknown[0])
    model = req.get("model")
    if model is not None and model not in model_names:
        raise ApiError(404, f"the model '{model}' does not exist; this server has {', '.join(model_names)} "
                            f"(GET /v1/models)", "model", code="model_not_found")
    for name, neutral in NEUTRAL.items():
        if req.get(name) not in (None, *neutral):
            raise ApiError(400, f"'{name}' is not supported by this server (leave it out)", name)
    for name in ("stream", "echo"):
        if req.get(name) is not None and not isinstance(req[name], bool):
            raise _type_error(name, "true or false", req[name])

    n = req.get("n", 1)
    if n is None:
        n = 1
    if not _is_int(n) or n < 1:
        raise _type_error("n", "an integer of at least 1", n)
    best_of = req.get("best_of")
    if best_of is not None and best_of != n:
        raise ApiError(400, "'best_of' is not supported (leave it out, or equal to n)", "best_of")
    stop = req.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOPS:
        raise ApiError(400, f"'stop' must be a non-empty string or a list of at most {MAX_STOPS} of them", "stop")
    logprobs = req.get("logprobs")
    if logprobs is not None and (not _is_int(logprobs) or not 0 <= logprobs <= MAX_LOGPROBS):
        raise _type_error("logprobs", f"an integer from 0 to {MAX_LOGPROBS}", logprobs)

    settings = {}
    for wire, (name, kind) in SAMPLING_FIELDS.items():
        value = req.get(wire)
        if value is None:
            continue
        if kind is bool and not isinstance(value, bool):
            raise _type_error(wire, "true or false", value)
        if kind is int and not _is_int(value):
            raise _type_error(wire, "an integer", value)
        if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise _type_error(wire, "a number", value)
        if kind is float and not math.isfinite(value):
            raise ApiError(400, f"'{wire}' must be a finite number, got {value!r}", wire)
        settings[name] = value
    max_tokens = settings.get("length", defaults.length)
    if max_tokens > limits.max_tokens:
        raise ApiError(400, f"'max_tokens' is {max_tokens}; this server's limit is {limits.max_tokens} "
                            f"(serve --max_tokens)", "max_tokens")
    settings["length"] = min(max_tokens, limits.max_tokens)
    try:
        opts = dataclasses.replace(defaults, **settings).check()
    except UserError as e:
        name = str(e).split()[0]
        wire = RENAMED.get(name, name)
        raise ApiError(400, str(e).replace(name, f"'{wire}'", 1), wire) from None

    prompts, texts = _prompts(req.get("prompt"), tok, n_vocab)
    if len(prompts) * n > limits.max_choices:
        raise ApiError(413, f"{len(prompts)} prompt(s) x n={n} is {len(prompts) * n} texts; this server takes "
                            f"at most {limits.max_choices} per request", "n")
    for ids in prompts:
        if len(ids) + opts.length > n_ctx:
            raise ApiError(400, f"this model's context is {n_ctx} tokens; the prompt has {len(ids)} and "
                                f"max_tokens is {opts.length}: shorten the prompt or lower max_tokens",
                           "prompt" if len(ids) >= n_ctx else "max_tokens", code="context_length_exceeded")
    return CompletionRequest(prompts, texts, opts, n, tuple(stop), bool(req.get("stream", False)), logprobs,
                             bool(req.get("echo", False)))

