"""The server, in process: a real uvicorn server on a free loopback port with a small random model
(2 layers x 64, context 256, 16 slots), driven by the `openai` client, raw HTTP and sockets."""

import json
import logging
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np
import openai
import pytest

from gpt2train import model as M
from gpt2train.config import Config
from gpt2train.sampling import SamplingOptions
from gpt2train.serving.engine import Admission, Engine
from gpt2train.serving.scheduler import Choice, Job, Outbox, Scheduler
from gpt2train.serving.server import ServeSettings, ServingServer, bind

SLOTS = 16
SETTINGS = ServeSettings(slots=SLOTS, max_queue=16, max_texts=64, idle_timeout=2.0, send_timeout=3.0,
                         request_timeout=120.0)


@pytest.fixture(scope="module")
def server(gpt2_tokenizer):
    cfg = Config(n_ctx=256, n_embd=64, n_layer=2, n_head=4, n_vocab=50257, model_path="/tmp/tiny-gpt2").validate()
    sock = bind("127.0.0.1", 0)
    # Small socket buffers (inherited by every connection) so that a client that stops reading
    # stalls the server's writes after kilobytes, not the megabytes loopback buffers hold.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
    srv = ServingServer(cfg, M.init_params(cfg, jax.random.PRNGKey(0)), gpt2_tokenizer,
                        SamplingOptions(length=8, top_k=40, seed=5), sock=sock, settings=SETTINGS, step=7).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def call(url, path, body=None, raw: bytes | None = None):
    """(status, JSON reply) of a GET (no body) or a POST."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def metric(url, name: str) -> float:
    text = urllib.request.urlopen(url + "/metrics", timeout=30).read().decode()
    found = re.search(r"^" + re.escape(name) + r" ([0-9.e+-]+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def wait_until(check, seconds: float = 30.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.05)
    return False


def idle(url) -> bool:
    health = call(url, "/health")[1]
    return health["busy_slots"] == 0 and health["queue"] == 0


# ----------------------------------------------------------------------------- the openai client
def test_openai_client_plain_streamed_and_batched(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny-gpt2"]
    plain = client.completions.create(model="tiny-gpt2", prompt="import os", max_tokens=12, seed=3,
                                      temperature=0.9, extra_body={"top_k": 20, "stop_at_eot": False})
    assert plain.object == "text_completion" and plain.choices[0].finish_reason == "length"
    assert plain.usage.completion_tokens == 12 and plain.usage.prompt_tokens == 2
    streamed = list(client.completions.create(model="tiny-gpt2", prompt="import os", max_tokens=12, seed=3,
                                              temperature=0.9, stream=True,
                                              extra_body={"top_k": 20, "stop_at_eot": False}))
    assert len(streamed) >= 3  # 12 tokens arrive in chunks of 4
    assert "".join(c.choices[0].text for c in streamed) == plain.choices[0].text
    assert streamed[-1].choices[0].finish_reason == "length"
    # A list of prompts with n samples each: choice p * n + j, each the same as asked alone.
    batch = client.completions.create(model="tiny-gpt2", prompt=["def f(x):", "class A:"], n=2, max_tokens=6,
                                      seed=11, extra_body={"stop_at_eot": False})
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    texts = [c.text for c in batch.choices]
    assert texts[0] != texts[1]  # the n samples of a prompt differ (seed + index)
    for i, prompt in enumerate(["def f(x):", "class A:"]):
        for j in range(2):
            alone = client.completions.create(model="tiny-gpt2", prompt=prompt, max_tokens=6, seed=11 + 2 * i + j,
                                              extra_body={"stop_at_eot": False})
            assert alone.choices[0].text == texts[2 * i + j]


def test_logprobs_echo_and_stop_strings(server, client, gpt2_tokenizer):
    body = dict(model="tiny-gpt2", prompt="The cat sat", max_tokens=10, temperature=0,
                extra_body={"stop_at_eot": False})
    r = client.completions.create(logprobs=3, **body)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 10 and "".join(lp.tokens) == r.choices[0].text
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and logprob < 0
        assert abs(max(top.values()) - logprob) < 1e-5 and token in top  # greedy picks the most likely
    echoed = client.completions.create(logprobs=1, echo=True, **body)
    e = echoed.choices[0]
    assert e.text == "The cat sat" + r.choices[0].text
    assert e.logprobs.tokens[:3] == ["The", " cat", " sat"] and e.logprobs.token_logprobs[0] is None
    assert all(x < 0 for x in e.logprobs.token_logprobs[1:])
    assert e.logprobs.token_logprobs[3:] == pytest.approx(lp.token_logprobs, abs=1e-5)
    # A stop string ends the text before it (streamed too, without a piece of it leaking out).
    stop = r.choices[0].text[len(r.choices[0].text) // 2:][:3]
    cut = r.choices[0].text[:r.choices[0].text.index(stop)]
    s = client.completions.create(stop=[stop, "@@never@@"], **body)
    assert s.choices[0].text == cut and s.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(stop=stop, stream=True, **body))
    assert "".join(c.choices[0].text for c in chunks) == cut and chunks[-1].choices[0].finish_reason == "stop"


def test_generate_alias_and_health_and_models(server):
    status, reply = call(server.url, "/generate", {"prompts": ["import os", "def f():"], "seed": 2, "length": 5})
    assert status == 200 and len(reply["completions"]) == 2 and reply["step"] == 7
    status, health = call(server.url, "/health")
    assert status == 200 and health["status"] == "ok" and health["slots"] == SLOTS and health["n_ctx"] == 256
    assert health["defaults"]["top_k"] == 40 and health["limits"]["max_tokens"] == 256
    assert call(server.url, "/v1/models")[1]["data"][0]["id"] == "tiny-gpt2"
    status, reply = call(server.url, "/v1/nope")
    assert status == 404 and "POST /v1/completions" in reply["error"]["message"]


def test_metrics_are_prometheus_text(server, client):
    client.completions.create(model="tiny-gpt2", prompt="x", max_tokens=3)
    text = urllib.request.urlopen(server.url + "/metrics", timeout=30).read().decode()
    for name in ("gpt2train_requests_total", "gpt2train_generated_tokens_total", "gpt2train_queue_depth",
                 "gpt2train_slots_busy", "gpt2train_time_to_first_token_seconds_bucket",
                 "gpt2train_time_per_token_seconds_bucket", "gpt2train_compiled_programs"):
        assert name in text, name
    assert metric(server.url, "gpt2train_slots") == SLOTS
    assert metric(server.url, "gpt2train_generated_tokens_total") >= 3


# ----------------------------------------------------------------------------- bad requests
@pytest.mark.parametrize("raw, status, param, words", [
    (b'{"prompt": "a", "max_tokens": 1000000000}', 400, "max_tokens", ["limit is 256", "--max_tokens"]),
    (b'{"prompt": "a", "temperature": NaN}', 400, "temperature", ["finite"]),
    (b'{"prompt": "a", "repetition_penalty": Infinity}', 400, "repetition_penalty", ["finite"]),
    (b'{"prompt": "a", "top_p": 1e999}', 400, "top_p", ["finite"]),
    (b'{"prompt": "a", "seed": 18446744073709551616}', 400, "seed", ["[0, 4294967296)"]),
    (b'{"prompt": "a", "top_k": -1}', 400, "top_k", ["at least 0"]),
    (b'{"prompt": "a", "max_tokens": "ten"}', 400, "max_tokens", ["an integer"]),
    (b'{"prompt": "a", "temprature": 0.5}', 400, "temprature", ["unknown field"]),
    (b'{"prompt": "a", "n": 0}', 400, "n", ["at least 1"]),
    (b'{"prompt": "a", "stop": [1]}', 400, "stop", ["stop"]),
    (b'{"prompt": "a", "logprobs": 9}', 400, "logprobs", ["0 to 5"]),
    (b'{"prompt": "a", "stream": "yes"}', 400, "stream", ["true or false"]),
    (b'{"prompt": "a", "model": "gpt-4"}', 404, "model", ["does not exist", "tiny-gpt2"]),
    (b'{"prompt": "a", "n": 40, "max_tokens": 1}', 413, "n", ["at most 64"]),
    (b'{"prompt": [99999999]}', 400, "prompt", ["token ids"]),
    (b'{"prompt": "word ' + b'word ' * 300 + b'"}', 400, "prompt", ["context is 256 tokens"]),
    (b'{not json', 400, None, ["not JSON"]),
])
def test_bad_requests_get_openai_errors_and_the_server_stays_up(server, raw, status, param, words):
    if status == 413:
        raw = raw.replace(b'"prompt": "a"', b'"prompt": ["a", "b"]')
    got, reply = call(server.url, "/v1/completions", raw=raw)
    assert got == status, reply
    assert reply["error"]["param"] == param and reply["error"]["type"]
    for w in words:
        assert w in reply["error"]["message"], reply["error"]["message"]
    assert call(server.url, "/v1/completions", {"prompt": "ok", "max_tokens": 2})[0] == 200


def test_a_body_over_the_limit_gets_413_before_it_is_sent(server):
    with socket.create_connection((server.host, server.port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n")
        sock.settimeout(30)
        reply = b""
        while not reply.endswith(b"}}") and (piece := sock.recv(65536)):
            reply += piece
    assert reply.startswith(b"HTTP/1.1 413") and b"limit is 1048576" in reply


# ----------------------------------------------------------------------------- batching
REQUESTS = [  # every kind of setting, side by side in one batch
    dict(temperature=0.0), dict(temperature=1.0, seed=1), dict(temperature=0.8, top_k=5, seed=2),
    dict(top_k=1, seed=3), dict(top_p=0.5, seed=4), dict(top_p=0.9, top_k=100, seed=5),
    dict(repetition_penalty=1.5, temperature=0.0), dict(repetition_penalty=1.3, seed=6, top_k=0),
    dict(temperature=1.4, top_k=200, seed=7), dict(temperature=0.6, top_p=0.8, top_k=30, seed=8),
    dict(seed=9, max_tokens=3), dict(seed=10, max_tokens=11), dict(top_k=64, seed=11), dict(top_k=65, seed=12),
    dict(seed=13, stop_at_eot=True), dict(seed=2**32 - 1),
]
PROMPTS = ["import os", "The cat", "def main(argv):\n    ", "1, 2, 3,", "Hello", "class A(object):",
           " word" * 130]  # its text needs the caches' first 256 slots: the others then read them too


def body_of(i: int) -> dict:
    settings = {"max_tokens": 8, "stop_at_eot": False, "top_k": 0, **REQUESTS[i % len(REQUESTS)]}
    return {"prompt": PROMPTS[i % len(PROMPTS)], "logprobs": 0, **settings}


def test_load_200_requests_from_16_clients_each_as_served_alone(server):
    """Each request alone (every other slot idle), then 200 of them from 16 concurrent clients:
    no error, and the same tokens and the same logprobs (float32, bitwise) as alone."""
    kinds = 32  # distinct requests
    alone = {}
    for i in range(kinds):
        status, reply = call(server.url, "/v1/completions", body_of(i))
        assert status == 200, reply
        alone[i] = reply["choices"][0]
    assert len({a["text"] for a in alone.values()}) > kinds // 2

    def one(i):
        return i % kinds, call(server.url, "/v1/completions", body_of(i % kinds))

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(200)))
    assert [status for _, (status, _) in results] == [200] * 200
    for kind, (_, reply) in results:
        got, want = reply["choices"][0], alone[kind]
        assert got["text"] == want["text"], (kind, body_of(kind))
        assert got["logprobs"]["tokens"] == want["logprobs"]["tokens"]
        assert got["logprobs"]["token_logprobs"] == want["logprobs"]["token_logprobs"]
    assert wait_until(lambda: idle(server.url))


def test_a_prompt_prefilled_beside_others_fills_its_slot_as_alone():
    """A bucket's prefill has a fixed row count: a prompt alone (row 0, the other rows dummies)
    and in row 2 beside other prompts fills its slot with bitwise the same numbers, and draws
    the same first token."""
    cfg = Config(n_ctx=256, n_embd=64, n_layer=2, n_head=4, n_vocab=50257, model_path="/tmp/tiny-gpt2").validate()
    engine = Engine(cfg, M.init_params(cfg, jax.random.PRNGKey(0)), 50256, slots=SLOTS)
    R, H = engine.prefill_rows(16), cfg.n_head
    assert R >= 3
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(0, 50257, int(rng.integers(1, 17)))] for _ in range(R)]

    def slot_state(slot):
        s, n = engine.state, len(prompts[2])
        return [s.token[slot], s.seen[slot], s.keys[slot], s.pos[slot], s.limit[slot], s.settings.top_p[slot],
                *(c[slot * H:(slot + 1) * H, :n] for c in s.cache["k"] + s.cache["v"])]

    for echo in (False, True):
        batch = [Admission(p, SamplingOptions(length=4, seed=i, top_p=0.9), 4, prompt_logprobs=echo)
                 for i, p in enumerate(prompts)]
        first_alone, (alone_lp,) = engine.admit([15], [batch[2]])
        alone = slot_state(15)
        first, together_lps = engine.admit(list(range(R)), batch)
        for a, b in zip(alone + [x[0] for x in first_alone], slot_state(2) + [x[2] for x in first]):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        together_lp = together_lps[2]
        if echo:
            assert alone_lp.shape == (len(prompts[2]) - 1,)
            np.testing.assert_array_equal(alone_lp, together_lp)
        for slot in range(SLOTS):
            engine.free(slot)


def test_a_prefill_call_takes_the_oldest_prompt_and_the_next_ones_of_its_bucket():
    class Buckets:  # what the scheduler asks of an engine to group prompts
        slots = 16
        bucket = staticmethod(lambda n: 16 if n <= 16 else 32)
        prefill_rows = staticmethod(lambda P: 64 // P)  # 4 rows of 16, 2 of 32

    scheduler = Scheduler(Buckets(), tokenizer=None, max_queue=100)
    job, echo_job = Job([], Outbox(None), timeout=60), Job([], Outbox(None), timeout=60, want_prompt_logprobs=True)
    lengths = [20, 3, 30, 5, 4, 17, 6, 2, 1]
    waiting = [Choice(echo_job if i == 3 else job, i, [0] * n, SamplingOptions()) for i, n in enumerate(lengths)]
    scheduler._waiting.extend(waiting)
    taken = lambda: [c.index for c in scheduler._next_prefill()]  # noqa: E731
    assert taken() == [0, 2]              # the oldest is of bucket 32: it and the next one of 32
    assert taken() == [1, 4, 6, 7]        # then bucket 16, without the echo request (another program)
    assert taken() == [3]
    scheduler._free = [0]                 # no more than the free slots
    assert taken() == [5]
    assert [c.index for c in scheduler._waiting] == [8]


def test_40_distinct_top_k_values_compile_nothing_new(server):
    before = metric(server.url, "gpt2train_compiled_programs")
    assert before > 0
    bodies = [{"prompt": "x" * (1 + k % 30), "max_tokens": 1 + k % 5, "top_k": k, "top_p": 0.5 + k / 100,
               "temperature": 0.1 * k, "repetition_penalty": 1 + k / 40, "seed": k * 7919}
              for k in range(1, 41)]
    with ThreadPoolExecutor(8) as pool:
        statuses = [s for s, _ in pool.map(lambda b: call(server.url, "/v1/completions", b), bodies)]
    assert statuses == [200] * 40
    assert metric(server.url, "gpt2train_compiled_programs") == before


def test_a_full_queue_gets_429(server):
    """16 texts fill the slots, 16 more the queue (max_queue 16): the next request gets 429."""
    long = {"prompt": "a", "max_tokens": 120, "n": 16, "stop_at_eot": False}
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(call, server.url, "/v1/completions", long)
        assert wait_until(lambda: call(server.url, "/health")[1]["busy_slots"] == SLOTS)
        second = pool.submit(call, server.url, "/v1/completions", long)
        assert wait_until(lambda: call(server.url, "/health")[1]["queue"] == 16)
        status, reply = call(server.url, "/v1/completions", {"prompt": "b", "max_tokens": 1})
        assert status == 429 and "queue holds 16" in reply["error"]["message"], reply
        assert first.result()[0] == 200 and second.result()[0] == 200
    assert call(server.url, "/v1/completions", {"prompt": "b", "max_tokens": 1})[0] == 200


# ----------------------------------------------------------------------------- clients that misbehave
class LogLines(logging.Handler):
    """Every line the server logs (tracebacks included) while a test runs."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines = []

    def emit(self, record):
        self.lines.append(logging.Formatter().format(record))

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture
def server_log():
    handler = LogLines()
    loggers = [logging.getLogger(n) for n in ("", "uvicorn", "uvicorn.error", "uvicorn.access", "gpt2train.serving")]
    for lg in loggers:
        lg.addHandler(handler)
    yield handler
    for lg in loggers:
        lg.removeHandler(handler)


def raw_request(server, body: dict, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect((server.host, server.port))
    data = json.dumps(body).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
    return sock


def test_disconnects_cancel_generation_and_leave_no_traceback(server, server_log):
    cancelled = metric(server.url, 'gpt2train_texts_finished_total{reason="cancelled"}')
    long = {"prompt": "a", "max_tokens": 120, "n": 8, "stop_at_eot": False}
    streaming = raw_request(server, {**long, "stream": True})
    assert streaming.recv(4096).startswith(b"HTTP/1.1 200")  # it runs...
    streaming.close()                                       # ...and its client leaves
    waiting = raw_request(server, long)                      # not streamed: leaves while waiting
    assert wait_until(lambda: call(server.url, "/health")[1]["busy_slots"] > 0)
    waiting.close()
    assert wait_until(lambda: idle(server.url), 20)
    # Freed by cancellation, not by running to the end: 16 texts counted as cancelled.
    assert metric(server.url, 'gpt2train_texts_finished_total{reason="cancelled"}') == cancelled + 16
    assert call(server.url, "/v1/completions", {"prompt": "still here", "max_tokens": 2})[0] == 200
    err = server_log.text
    assert "Traceback" not in err and "Exception" not in err and "BrokenPipe" not in err, err


def test_a_client_that_stops_reading_blocks_no_one(server, server_log):
    stalled = raw_request(server, {"prompt": "a", "max_tokens": 120, "n": 12, "logprobs": 5, "stream": True,
                                   "stop_at_eot": False}, rcvbuf=4096)
    assert wait_until(lambda: call(server.url, "/health")[1]["busy_slots"] > 0)
    # Others are served meanwhile, and the stalled texts run to their end: their slots free up.
    assert call(server.url, "/v1/completions", {"prompt": "next", "max_tokens": 4})[0] == 200
    assert wait_until(lambda: idle(server.url), 60)
    # After send_timeout (3 s) without reading, the server drops the connection.
    time.sleep(SETTINGS.send_timeout + 1)
    stalled.settimeout(30)
    received = 0
    while chunk := stalled.recv(1 << 16):
        received += len(chunk)
    stalled.close()
    assert received > 0
    err = server_log.text
    assert "read nothing for 3 s" in err and "Traceback" not in err, err


def test_100_idle_connections_are_closed_and_block_nothing(server):
    idle_socks = [socket.create_connection((server.host, server.port)) for _ in range(100)]
    slow = socket.create_connection((server.host, server.port))
    slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # headers that never end
    try:
        assert call(server.url, "/v1/completions", {"prompt": "hi", "max_tokens": 2})[0] == 200
        start = time.monotonic()
        for s in idle_socks + [slow]:
            s.settimeout(SETTINGS.idle_timeout + 10)
            assert s.recv(1024) == b""  # closed by the server
        assert time.monotonic() - start < SETTINGS.idle_timeout + 10
    finally:
        for s in idle_socks + [slow]:
            s.close()


# ----------------------------------------------------------------------------- the playground page
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def browser():
    import os
    import shutil
    import tempfile
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        why = "needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)"
        if os.environ.get("CI") == "true":  # .ci/run installs them: a skipped browser test proves nothing
            pytest.fail(f"CI=true but the playground test {why}")
        pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    profile = tempfile.mkdtemp(prefix="gpt2train-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", f"--user-data-dir={profile}", "--window-size=1100,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def test_playground_streams_text_and_stops_in_chromium(server, browser, tmp_path):
    import os
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    browser.get(server.url + "/")
    assert "gpt2train playground" in browser.title and browser.find_element(By.ID, "model").text == "tiny-gpt2"
    prompt = browser.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys("The meaning of life is")
    browser.execute_script("const s = document.getElementById('max_tokens'); s.value = 120;"
                           "s.dispatchEvent(new Event('input'));")
    assert browser.find_element(By.ID, "max_tokens-value").text == "120"
    browser.find_element(By.ID, "seed").send_keys("7")
    cancelled = metric(server.url, 'gpt2train_texts_finished_total{reason="cancelled"}')
    browser.find_element(By.ID, "generate").click()
    completion = WebDriverWait(browser, 60, poll_frequency=0.02).until(
        lambda d: d.find_element(By.ID, "completion").text or False)
    browser.find_element(By.ID, "stop").click()
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "status").text != "generating…")
    status = browser.find_element(By.ID, "status").text
    shown = browser.find_element(By.ID, "completion").text
    assert completion and shown.startswith(completion.rstrip())
    browser.save_screenshot(str(tmp_path / "playground.png"))
    if os.environ.get("GPT2TRAIN_PLAYGROUND_SCREENSHOT"):  # the README's picture
        browser.save_screenshot(os.environ["GPT2TRAIN_PLAYGROUND_SCREENSHOT"])
    assert (tmp_path / "playground.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert status == "stopped", status  # Stop pressed while text was streaming in
    assert wait_until(lambda: idle(server.url))
    assert metric(server.url, 'gpt2train_texts_finished_total{reason="cancelled"}') == cancelled + 1
    assert len(shown) < 120 * 8  # the text ended early
    assert browser.find_element(By.ID, "generate").is_enabled()


def test_foreground_server_ends_as_ctrl_c_does_even_when_the_signal_is_dropped(gpt2_tokenizer, monkeypatch):
    """`serve` exits 130 on Ctrl-C: when uvicorn's shutdown returns without the KeyboardInterrupt
    (asyncio's runner can drop the signal uvicorn raises again), run() raises it itself."""
    cfg = Config(n_ctx=64, n_embd=32, n_layer=1, n_head=2, n_vocab=50257, model_path="/tmp/tiny-gpt2").validate()
    srv = ServingServer(cfg, M.init_params(cfg, jax.random.PRNGKey(0)), gpt2_tokenizer, SamplingOptions(length=2),
                        sock=bind("127.0.0.1", 0), settings=SETTINGS)
    monkeypatch.setattr(srv.uvicorn, "run", lambda sockets: None)  # shut down, the signal lost
    with pytest.raises(KeyboardInterrupt):
        srv.run()
    assert not srv.scheduler.alive  # stopped on the way out
    srv.sock.close()
