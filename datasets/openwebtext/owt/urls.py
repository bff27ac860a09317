"""Reading and normalising URL lists, so the same page listed twice is fetched once."""

from __future__ import annotations

import hashlib
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit


def normalize(url: str) -> str | None:
    """Canonical form (lower-case scheme and host, no fragment, no default port); None if not http(s)."""
    parts = urlsplit(url.strip())
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        return None
    host = parts.hostname.lower()
    port = parts.port
    if port and not ((parts.scheme.lower() == "http" and port == 80) or (parts.scheme.lower() == "https" and port == 443)):
        host = f"{host}:{port}"
    return urlunsplit((parts.scheme.lower(), host, parts.path or "/", parts.query, ""))


def read_urls(path: Path) -> tuple[list[str], int, int]:
    """(unique normalised URLs in order, duplicates dropped, invalid lines dropped)."""
    seen: dict[str, None] = {}
    duplicates = invalid = 0
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        url = normalize(line)
        if url is None:
            invalid += 1
        elif url in seen:
            duplicates += 1
        else:
            seen[url] = None
    return list(seen), duplicates, invalid


def url_id(url: str) -> str:
    return hashlib.sha1(url.encode()).hexdigest()
