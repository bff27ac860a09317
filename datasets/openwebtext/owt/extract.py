"""Main text out of downloaded pages (trafilatura), deduplicated by content, one file per document.

Decoding: the charset of the Content-Type header, else of a <meta> tag, else UTF-8 if the bytes
are valid UTF-8, else trafilatura's own detection. Pages with no main text are recorded as
"empty"; a page whose normalised text was seen before is recorded as "duplicate" of it.
"""

from __future__ import annotations

import codecs
import hashlib
import re
from pathlib import Path

from tqdm import tqdm

from .manifest import Manifest, write_atomic

_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9_\-:.]+)""", re.I)
_HEADER_CHARSET = re.compile(r"charset\s*=\s*[\"']?([A-Za-z0-9_\-:.]+)", re.I)


def _known(name: str | None) -> str | None:
    if not name:
        return None
    try:
        return codecs.lookup(name.decode("ascii", "ignore") if isinstance(name, bytes) else name).name
    except LookupError:
        return None


def decode_page(body: bytes, content_type: str = "") -> str | bytes:
    """The page as text when its encoding is known; raw bytes (for trafilatura to detect) otherwise."""
    header = _HEADER_CHARSET.search(content_type or "")
    meta = _META_CHARSET.search(body[:4096])
    for charset in (_known(header.group(1)) if header else None, _known(meta.group(1)) if meta else None):
        if charset:
            return body.decode(charset, errors="replace")
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        return body


def content_key(text: str) -> str:
    """Hash of the text with case and whitespace normalised: re-published copies collide."""
    return hashlib.sha1(" ".join(text.lower().split()).encode()).hexdigest()


def extract_text(body: bytes, content_type: str = "") -> str:
    import trafilatura

    text = trafilatura.extract(decode_page(body, content_type), include_comments=False, include_tables=False)
    return (text or "").strip()


def extract(work: Path, *, min_chars: int = 1, progress: bool = True) -> dict:
    """Turn every downloaded page not yet in work/extract.jsonl into work/text/**.txt."""
    downloads = Manifest(work / "download.jsonl", "url")
    manifest = Manifest(work / "extract.jsonl", "url")
    seen = {e["hash"]: e["url"] for e in manifest.entries.values() if e["status"] == "ok"}
    todo = [e for e in downloads.entries.values() if e["status"] == "ok" and e["url"] not in manifest]
    for entry in tqdm(todo, desc="extract", unit="page", disable=not progress):
        body = (work / entry["file"]).read_bytes()
        text = extract_text(body, entry.get("content_type", ""))
        if len(text) < min_chars:
            manifest.add({"url": entry["url"], "status": "empty"})
            continue
        key = content_key(text)
        if key in seen:
            manifest.add({"url": entry["url"], "status": "duplicate", "of": seen[key]})
            continue
        path = work / "text" / key[:2] / f"{key}.txt"
        write_atomic(path, text.encode("utf-8"))
        seen[key] = entry["url"]
        manifest.add({"url": entry["url"], "status": "ok", "hash": key, "file": str(path.relative_to(work))})
    statuses = [e["status"] for e in manifest.entries.values()]
    return {"extracted_now": len(todo), **{s: statuses.count(s) for s in ("ok", "empty", "duplicate")}}
