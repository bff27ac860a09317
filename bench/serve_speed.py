"""The server under load: 1, 4 and 16 concurrent streaming clients at the 124M shape.

    python -m bench.serve_speed                      # 124M shape, random weights, 16 slots
    python -m bench.serve_speed --smoke              # a tiny model, seconds (checks the script)
    python -m bench.serve_speed --clients 1,4,16 --requests 3 --max_tokens 64 --out bench/results

Each client sends its requests one after another (a 22-token prompt, `max_tokens` new tokens,
temperature 1 with top-k 40, its own seed) as a streaming POST /v1/completions, and times when
each piece of text arrives. Reported per level: aggregate tokens/s (all clients' tokens over the
level's wall time), time to first token p50/p95, and per-token latency (a text's time after its
first token over its remaining tokens, median and p95). Beside them, the single-request
generator (`generate.Generator`, batch 1, the same prompt and length): the CLI's tokens/s.

The server runs in this process (uvicorn in a thread), the clients in threads over loopback with
http.client. Timing figures belong in reports, never in tests.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import pathlib
import statistics
import threading
import time

import jax
import numpy as np

from bench.run import cpu_model_and_flags, write_report
from gpt2train import model as M
from gpt2train.config import Config
from gpt2train.generate import Generator
from gpt2train.inference import hold_params, inference_config
from gpt2train.sampling import SamplingOptions
from gpt2train.serving.server import ServeSettings, ServingServer
from gpt2train.tokenizer import GPT2_ENCODER_DIR, load_tokenizer

PROMPT = ("The history of the city begins in the early years of the nineteenth century, when a small group of "
          "settlers arrived")


def percentile(values, q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def stream_one(host: str, port: int, body: dict) -> dict:
    """One streamed completion: arrival time of each piece, tokens counted from the pieces' logprobs."""
    conn = http.client.HTTPConnection(host, port, timeout=600)
    start = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"status {resp.status}: {resp.read()[:200]!r}")
    first, last, tokens = None, None, 0
    buffer = b""
    while True:
        chunk = resp.read1(65536)
        if not chunk:
            break
        buffer += chunk
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            data = event[len(b"data: "):]
            if data == b"[DONE]":
                continue
            choice = json.loads(data)["choices"][0]
            count = len(choice["logprobs"]["tokens"]) if choice.get("logprobs") else 0
            if count:
                now = time.perf_counter()
                first = first or now
                last = now
                tokens += count
    conn.close()
    return {"ttft": first - start, "tokens": tokens,
            "per_token": (last - first) / (tokens - 1) if tokens > 1 else float("nan")}


def run_level(server, clients: int, requests: int, max_tokens: int) -> dict:
    results, errors = [], []

    def client(c: int) -> None:
        for r in range(requests):
            body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 1.0, "top_k": 40,
                    "seed": 1000 * c + r, "stream": True, "logprobs": 0, "stop_at_eot": False}
            try:
                results.append(stream_one(server.host, server.port, body))
            except Exception as e:  # counted, not raised: the report says how many failed
                errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["ttft"] for r in results]
    per_token = [r["per_token"] for r in results if r["per_token"] == r["per_token"]]
    return {"clients": clients, "requests": len(results), "errors": len(errors), "tokens": tokens,
            "seconds": round(wall, 2), "tokens_per_s": round(tokens / wall, 2),
            "ttft_p50_s": round(percentile(ttft, 50), 3), "ttft_p95_s": round(percentile(ttft, 95), 3),
            "per_token_p50_ms": round(1000 * percentile(per_token, 50), 1),
            "per_token_p95_ms": round(1000 * percentile(per_token, 95), 1)}


def single_request_generator(cfg, params, tok, max_tokens: int, repeats: int = 2) -> dict:
    """The CLI's path, batch 1: tokens/s of Generator.generate over the same prompt and length."""
    gen = Generator(cfg, params, tok)
    opts = SamplingOptions(length=max_tokens, temperature=1.0, top_k=40, seed=1, stop_at_eot=False)
    gen.generate([PROMPT], opts)  # compiles
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        gen.generate([PROMPT], opts)
        times.append(time.perf_counter() - t)
    seconds = statistics.median(times)
    return {"tokens": max_tokens, "seconds": round(seconds, 3), "tokens_per_s": round(max_tokens / seconds, 2)}


def markdown(report: dict) -> str:
    lines = [f"# Serving benchmark ({report['shape']})", "",
             f"{report['cpu']} ({', '.join(report['isa_flags']) or 'no AVX2/AVX-512/AMX'}), {report['cores']} cores, load average at start {report['load_average']} and at the end "
             f"{report['load_average_end']}; {report['precision']} (the `inference_precision: auto` choice here), "
             f"{report['slots']} slots, {report['max_tokens']} new tokens per request, "
             f"{report['prompt_tokens']}-token prompt, "
             f"warm-up (compiling) {report['warm_up_s']} s.", "",
             "| clients | requests | errors | tokens/s (all clients) | vs 1 client | TTFT p50 | TTFT p95 | "
             "per token p50 | per token p95 |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    one = report["levels"][0]["tokens_per_s"]
    for lv in report["levels"]:
        lines.append(f"| {lv['clients']} | {lv['requests']} | {lv['errors']} | {lv['tokens_per_s']} | "
                     f"{lv['tokens_per_s'] / one:.2f}x | {lv['ttft_p50_s']} s | {lv['ttft_p95_s']} s | "
                     f"{lv['per_token_p50_ms']} ms | {lv['per_token_p95_ms']} ms |")
    g = report["generator"]
    lines += ["", f"Single-request generator (the CLI's `Generator`, batch 1, same prompt and length): "
                  f"{g['tokens_per_s']} tokens/s ({g['seconds']} s for {g['tokens']} tokens)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="a tiny model: checks the script in seconds")
    p.add_argument("--clients", default="1,4,16")
    p.add_argument("--requests", type=int, default=3, help="requests per client at each level")
    p.add_argument("--max_tokens", type=int, default=64)
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--out", default="bench/results")
    args = p.parse_args(argv)
    shape = dict(n_layer=2, n_embd=64, n_head=4, n_ctx=128) if args.smoke else \
        dict(n_layer=12, n_embd=768, n_head=12, n_ctx=1024)
    cfg = Config(n_vocab=50257, model_path="gpt2-124M-random" if not args.smoke else "tiny", **shape).validate()
    tok = load_tokenizer(GPT2_ENCODER_DIR)
    # As `serve` and `generate` load a model (inference.load_for_inference): in the precision
    # `inference_precision: auto` picks on this machine, weights held in it.
    cfg = inference_config(cfg)
    params = hold_params(M.init_params(cfg, jax.random.PRNGKey(0)), cfg)
    load = [round(x, 2) for x in os.getloadavg()]  # before the run (another process's load shows here)
    start = time.perf_counter()
    server = ServingServer(cfg, params, tok, SamplingOptions(), port=0, access_log=False,
                           settings=ServeSettings(slots=args.slots, max_queue=1024)).start()
    warm = time.perf_counter() - start
    levels = []
    try:
        for clients in (int(c) for c in args.clients.split(",")):
            stream_one(server.host, server.port, {"prompt": PROMPT, "max_tokens": 2, "stream": True, "logprobs": 0})  # settle
            level = run_level(server, clients, args.requests, args.max_tokens)
            print(json.dumps(level), flush=True)
            levels.append(level)
    finally:
        server.stop()
    generator = single_request_generator(cfg, params, tok, args.max_tokens)
    print("generator", json.dumps(generator), flush=True)
    cpu, isa = cpu_model_and_flags()
    report = {"shape": "smoke" if args.smoke else "124M", "cpu": cpu, "isa_flags": isa, "cores": os.cpu_count(),
              "load_average": load, "load_average_end": [round(x, 2) for x in os.getloadavg()],
              "prompt_tokens": len(tok.encode(PROMPT)), "slots": args.slots, "precision": cfg.precision,
              "max_tokens": args.max_tokens, "warm_up_s": round(warm, 1), "levels": levels, "generator": generator}
    write_report(report, markdown(report), pathlib.Path(args.out), "serve_report")
    return report


if __name__ == "__main__":
    main()
