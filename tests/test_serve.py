"""The HTTP API, in process: a real server on a free port, a small random model, real requests."""

import json
import threading
import urllib.error
import urllib.request

import jax
import pytest

from gpt2train import model as M
from gpt2train.config import Config
from gpt2train.generate import Generator
from gpt2train.sampling import SamplingOptions
from gpt2train.serve import GenerationService, make_server


@pytest.fixture(scope="module")
def url(gpt2_tokenizer):
    cfg = Config(n_ctx=32, n_embd=64, n_layer=2, n_head=4, n_vocab=50257).validate()
    gen = Generator(cfg, M.init_params(cfg, jax.random.PRNGKey(0)), gpt2_tokenizer, chunk=8)
    server = make_server("127.0.0.1", 0)
    server.service = GenerationService(gen, SamplingOptions(length=6, top_k=40, seed=5), batch_size=2, step=7)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def call(url, path, body=None):
    """(status, JSON reply) of a GET (body None) or a POST of `body` (a dict, or raw bytes)."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_health_reports_the_model_and_defaults(url):
    status, reply = call(url, "/health")
    assert status == 200 and reply["status"] == "ok" and reply["step"] == 7 and reply["n_ctx"] == 32
    assert reply["defaults"]["top_k"] == 40 and "POST /generate" in reply["usage"]


def test_generate_is_reproducible_and_takes_each_setting(url, gpt2_tokenizer):
    status, a = call(url, "/generate", {"prompt": "import os", "seed": 3})
    assert status == 200 and len(a["completions"]) == 1 and a["step"] == 7
    assert len(gpt2_tokenizer.encode(a["completions"][0])) <= 6 + 2  # the default length (re-encoding may differ)
    assert call(url, "/generate", {"prompt": "import os", "seed": 3})[1]["completions"] == a["completions"]
    assert call(url, "/generate", {"prompt": "import os", "seed": 4})[1]["completions"] != a["completions"]
    greedy = {"prompt": "import os", "temperature": 0, "length": 12, "stop_at_eot": False}
    g1, g2 = call(url, "/generate", greedy)[1], call(url, "/generate", {**greedy, "seed": 9})[1]
    assert g1["completions"] == g2["completions"]  # greedy ignores the seed
    assert len(gpt2_tokenizer.encode(g1["completions"][0])) >= 10


def test_several_prompts_are_batched_in_order(url):
    prompts = ["def f(x):", "class A:", "import sys"]
    status, reply = call(url, "/generate", {"prompts": prompts, "temperature": 0.0, "length": 5, "stop_at_eot": False})
    assert status == 200 and len(reply["completions"]) == 3
    alone = [call(url, "/generate", {"prompt": p, "temperature": 0.0, "length": 5, "stop_at_eot": False})[1]
             for p in prompts]
    assert reply["completions"] == [r["completions"][0] for r in alone]


def test_streaming_sends_text_as_it_comes_then_the_whole_reply(url):
    body = {"prompts": ["def f(x):", "class A:"], "temperature": 0.0, "length": 20, "stop_at_eot": False}
    req = urllib.request.Request(url + "/generate", data=json.dumps({**body, "stream": True}).encode())
    with urllib.request.urlopen(req, timeout=120) as r:
        assert r.headers["Content-Type"].startswith("application/x-ndjson")
        lines = [json.loads(x) for x in r.read().decode().splitlines()]
    pieces, last = lines[:-1], lines[-1]
    assert last["completions"] == call(url, "/generate", body)[1]["completions"]
    assert len(pieces) >= 4  # 20 tokens in chunks of 8: each row gets text at least twice
    for row in (0, 1):
        assert "".join(p["text"] for p in pieces if p["row"] == row) == last["completions"][row]


def test_a_prompt_longer_than_the_context_is_cut_with_a_warning(url):
    status, reply = call(url, "/generate", {"prompt": "word " * 100, "length": 4})
    assert status == 200 and len(reply["completions"]) == 1
    assert any("longer than the 32-token context" in w for w in reply["warnings"])


@pytest.mark.parametrize("body, status, words", [
    (b"{not json", 400, ["not JSON"]),
    ([1, 2], 400, ["JSON object"]),
    ({"prompt": "a", "temprature": 0.5}, 400, ["temprature", "temperature"]),
    ({}, 400, ["exactly one of"]),
    ({"prompt": "a", "prompts": ["b"]}, 400, ["exactly one of"]),
    ({"prompts": "a"}, 400, ["list of strings"]),
    ({"prompt": "a", "length": "ten"}, 400, ["\"length\" must be an integer"]),
    ({"prompt": "a", "length": True}, 400, ["\"length\" must be an integer"]),
    ({"prompt": "a", "stop_at_eot": 1}, 400, ["\"stop_at_eot\" must be true or false"]),
    ({"prompt": "a", "stream": "yes"}, 400, ["\"stream\" must be true or false"]),
    ({"prompt": "a", "temperature": -1}, 400, ["temperature must be >= 0"]),
    ({"prompt": "a", "top_p": 0}, 400, ["top_p must be in (0, 1]"]),
    ({"prompt": "a", "length": 0}, 400, ["length must be at least 1"]),
    ({"prompt": "a", "temperature": float("nan")}, 400, ["temperature must be a finite number"]),
    ({"prompt": "a", "repetition_penalty": float("inf")}, 400, ["repetition_penalty must be a finite number"]),
    ({"prompt": "a", "seed": 2**64}, 400, ["seed must be in [0, 4294967296)"]),
])
def test_bad_requests_get_400_naming_the_problem_and_the_server_stays_up(url, body, status, words):
    got, reply = call(url, "/generate", body)
    assert got == status, reply
    for w in words:
        assert w in reply["error"], reply["error"]
    assert call(url, "/generate", {"prompt": "ok", "length": 2})[0] == 200


def test_unknown_paths_get_404(url):
    assert call(url, "/nope")[0] == 404
    assert call(url, "/generat", {"prompt": "a"})[0] == 404


def test_every_sampling_option_is_a_request_field(url):
    """Options are declared once (sampling.SamplingOptions): the server takes each one."""
    from gpt2train.sampling import option_fields
    values = {"length": 3, "temperature": 0.7, "top_k": 5, "top_p": 0.9, "repetition_penalty": 1.3, "seed": 2,
              "stop_at_eot": False}
    assert set(values) == {f.name for f in option_fields()}  # a new option: add it here too
    status, reply = call(url, "/generate", {"prompt": "import os", **values})
    assert status == 200, reply
