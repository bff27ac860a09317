"""Concurrent, polite, resumable download of a URL list.

Each URL ends in the manifest as "ok" (its bytes saved under html/), or "failed" after
retries (a 4xx answer fails at once; 5xx, 429, timeouts and connection errors are retried
with exponential backoff). A rerun skips every URL in the manifest. Politeness: at most
`concurrency` requests at once overall, one at a time per host, `per_host_delay` seconds
between requests to the same host.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import requests
from tqdm import tqdm

from .manifest import Manifest, write_atomic
from .urls import url_id

USER_AGENT = "gpt2train-openwebtext/0.1 (corpus builder)"
RETRYABLE = {429, 500, 502, 503, 504}


@dataclass
class DownloadSettings:
    concurrency: int = 8
    per_host_delay: float = 1.0
    timeout: float = 20.0
    retries: int = 3
    backoff: float = 1.0  # seconds before the first retry; doubles each time
    max_bytes: int = 5_000_000


class HostGate:
    """One request at a time per host, spaced by `delay` seconds."""

    def __init__(self, delay: float):
        self.delay = delay
        self._locks: dict[str, threading.Lock] = {}
        self._last: dict[str, float] = {}
        self._guard = threading.Lock()

    def __call__(self, host: str):
        with self._guard:
            lock = self._locks.setdefault(host, threading.Lock())
        gate = self

        class _Held:
            def __enter__(self):
                lock.acquire()
                wait = gate._last.get(host, 0.0) + gate.delay - time.monotonic()
                if wait > 0:
                    time.sleep(wait)

            def __exit__(self, *exc):
                gate._last[host] = time.monotonic()
                lock.release()

        return _Held()


class TooLarge(Exception):
    pass


def _fetch(session: requests.Session, url: str, s: DownloadSettings) -> tuple[int, bytes, str]:
    with session.get(url, timeout=s.timeout, stream=True, headers={"User-Agent": USER_AGENT}) as r:
        length = int(r.headers.get("Content-Length") or 0)
        if length > s.max_bytes:
            raise TooLarge(f"{length} bytes > max_bytes {s.max_bytes}")
        body = bytearray()
        for block in r.iter_content(65536):
            body += block
            if len(body) > s.max_bytes:
                raise TooLarge(f"more than max_bytes {s.max_bytes}")
        return r.status_code, bytes(body), r.headers.get("Content-Type", "")


def download_one(session, gate: HostGate, url: str, html_dir: Path, s: DownloadSettings) -> dict:
    host = urlsplit(url).netloc
    error = ""
    for attempt in range(s.retries + 1):
        if attempt:
            time.sleep(s.backoff * 2 ** (attempt - 1))
        try:
            with gate(host):
                status, body, content_type = _fetch(session, url, s)
        except TooLarge as e:
            return {"url": url, "status": "failed", "error": f"too large: {e}"}
        except requests.RequestException as e:
            error = f"{type(e).__name__}: {e}"
            continue
        if status == 200:
            uid = url_id(url)
            path = html_dir / uid[:2] / f"{uid}.html"
            write_atomic(path, body)
            return {"url": url, "status": "ok", "file": str(path.relative_to(html_dir.parent)),
                    "content_type": content_type, "bytes": len(body), "attempts": attempt + 1}
        error = f"HTTP {status}"
        if status not in RETRYABLE:
            break
    return {"url": url, "status": "failed", "error": error}


def download(urls: list[str], work: Path, s: DownloadSettings, *, progress: bool = True) -> dict:
    """Fetch every URL not yet in work/download.jsonl; returns counts."""
    manifest = Manifest(work / "download.jsonl", "url")
    todo = [u for u in urls if u not in manifest]
    gate = HostGate(s.per_host_delay)
    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(pool_connections=s.concurrency, pool_maxsize=s.concurrency)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    with ThreadPoolExecutor(max(1, s.concurrency)) as pool, tqdm(total=len(todo), desc="download", unit="page",
                                                                 disable=not progress) as bar:
        for entry in pool.map(lambda u: download_one(session, gate, u, work / "html", s), todo):
            manifest.add(entry)
            bar.update(1)
    statuses = [manifest.entries[u]["status"] for u in urls if u in manifest]
    return {"fetched_now": len(todo), "skipped": len(urls) - len(todo),
            "ok": statuses.count("ok"), "failed": statuses.count("failed")}
