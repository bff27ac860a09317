"""Append-only JSONL manifests: what a stage has finished, so a rerun skips it."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path


class Manifest:
    """One JSON line per finished item, keyed by `key`; a torn last line (a kill mid-write) is ignored."""

    def __init__(self, path: Path, key: str):
        self.path, self.key = Path(path), key
        self.entries: dict[str, dict] = {}
        self._lock = threading.Lock()
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue
                self.entries[entry[key]] = entry

    def __contains__(self, item: str) -> bool:
        return item in self.entries

    def add(self, entry: dict) -> None:
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(entry, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
            self.entries[entry[self.key]] = entry


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary name and rename, so a file is either whole or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
