"""The OpenWebText pipeline end to end against pages served on 127.0.0.1."""

import collections
import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import ENCODER_DIR, REPO, tiny_config, write_config
from gpt2train import records

PIPELINE = REPO / "datasets" / "openwebtext" / "pipeline.py"
WORDS = "river bridge council budget winter harbour station library garden market".split()


def article(title, seed, lang="en"):
    if lang == "ru":
        body = " ".join(f"<p>Москва, абзац {i}: городской совет обсудил новый мост и бюджет на зиму.</p>"
                        for i in range(8))
        head = '<meta charset="windows-1251">'
    else:
        body = " ".join(
            f"<p>{title} part {i}: the {WORDS[(seed + i) % 10]} near the {WORDS[(seed * 3 + i) % 10]} was discussed "
            f"again by residents, who asked about the {WORDS[(seed + 2 * i) % 10]} and its cost.</p>" for i in range(8))
        head = '<meta charset="utf-8">'
    return (f"<html><head>{head}<title>{title}</title></head><body><nav>Home | News | About</nav>"
            f"<article><h1>{title}</h1>{body}</article><footer>(c) example</footer></body></html>")


PAGES = {
    "/a": article("Story A", 1), "/a-copy": article("Story A", 1), "/b": article("Story B", 2),
    "/flaky": article("Story C", 3), "/empty": "<html><body><nav>menu</nav></body></html>",
}


class Handler(BaseHTTPRequestHandler):
    hits = collections.Counter()

    def do_GET(self):  # noqa: N802
        Handler.hits[self.path] += 1
        if self.path == "/flaky" and Handler.hits[self.path] == 1:
            return self.send_error(500)
        if self.path == "/broken":
            return self.send_error(503)
        if self.path == "/cp1251":
            body, ctype = article("Новости", 4, "ru").encode("cp1251"), "text/html"
        elif self.path in PAGES:
            body, ctype = PAGES[self.path].encode(), "text/html; charset=utf-8"
        else:
            return self.send_error(404)
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def pipeline(*args):
    proc = subprocess.run([sys.executable, str(PIPELINE), *args], cwd=REPO, capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return {line["stage"]: line for line in map(json.loads, proc.stdout.splitlines())}


def test_urls_to_records_to_training(server, tmp_path):
    urls = tmp_path / "urls.txt"
    paths = ["/a", "/a#comments", "/a-copy", "/b", "/flaky", "/broken", "/missing", "/empty", "/cp1251"]
    urls.write_text("# a test list\n" + "\n".join(server + p for p in paths) + "\nftp://example.com/x\n")
    work = tmp_path / "work"
    args = ["all", "--urls", str(urls), "--work", str(work), "--encoder_path", str(ENCODER_DIR), "--quiet",
            "--per_host_delay", "0", "--backoff", "0.01", "--retries", "2", "--min_chars", "100",
            "--minimum_size", "16", "--workers", "0"]
    first = pipeline(*args)
    assert first["download"] == {"stage": "download", "urls": 8, "duplicate_urls": 1, "invalid_urls": 1,
                                 "fetched_now": 8, "skipped": 0, "ok": 6, "failed": 2}
    assert Handler.hits["/flaky"] == 2 and Handler.hits["/broken"] == 3 and Handler.hits["/missing"] == 1
    assert Handler.hits["/a"] == 1  # the fragment variant is the same URL
    assert (first["extract"]["ok"], first["extract"]["empty"], first["extract"]["duplicate"]) == (4, 1, 1)
    texts = sorted(p.read_text() for p in (work / "text").rglob("*.txt"))
    assert any("Москва, абзац 0" in t for t in texts)  # windows-1251 decoded through its <meta> charset
    assert not any("Home | News" in t for t in texts)  # navigation is not main text
    docs = [t for f in sorted((work / "records").glob("*.tfrecords")) for t, _ in records.read_documents(str(f))]
    assert len(docs) == 4 and first["encode"]["documents"] == 4

    hits_before = sum(Handler.hits.values())
    again = pipeline(*args)  # resumes: nothing is fetched, extracted or encoded twice
    assert sum(Handler.hits.values()) == hits_before
    assert again["download"]["fetched_now"] == 0 and again["extract"]["extracted_now"] == 0
    assert again["encode"]["resumed_files"] == 1 and again["encode"]["files"] == 0

    cfg = tiny_config(tmp_path, input="openwebtext", data_path=str(work / "records"), eval_data_path=None,
                      eval_steps=0, n_ctx=32, stitch=2, max_steps=3, train_steps=3)
    trained = subprocess.run([sys.executable, "main.py", "--model", str(write_config(tmp_path / "owt.json", cfg))],
                             cwd=REPO, capture_output=True, text=True, timeout=300,
                             env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"})
    assert trained.returncode == 0, trained.stderr
    assert (tmp_path / "model" / "checkpoints" / "3").is_dir()


def test_missing_inputs_are_clear_errors(tmp_path):
    proc = subprocess.run([sys.executable, str(PIPELINE), "download", "--work", str(tmp_path), "--urls",
                           str(tmp_path / "none.txt")], capture_output=True, text=True)
    assert proc.returncode != 0 and "URL list" in proc.stderr and "not found" in proc.stderr
    proc = subprocess.run([sys.executable, str(PIPELINE), "encode", "--work", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "--encoder_path" in proc.stderr
