"""Paths that may be local or remote (gs://, s3://, memory://... through fsspec)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import fsspec
from fsspec.implementations.local import LocalFileSystem

from gpt2train.errors import UserError



def _split_spec(spec: str | Sequence[str]) -> list[str]:
    items = [spec] if isinstance(spec, str) else list(spec)
    return [part.strip() for item in items for part in item.split(",") if part.strip()]


def _is_hidden(path: str, root: str) -> bool:
    relative = path[len(root) :].strip("/")
    return any(part.startswith(".") for part in relative.split("/"))


def _files_under(fs, directory: str) -> list[str]:
    directory = directory.rstrip("/")
    return sorted(p for p in fs.find(directory) if not _is_hidden(p, directory))


def _expand_one(item: str) -> list[str]:
    fs, path = fsspec.core.url_to_fs(item)
    if any(c in path for c in "*?["):
        matches = sorted(fs.glob(path))
    else:
        matches = [path] if fs.exists(path) else []
    files = []
    for match in matches:
        files.extend(_files_under(fs, match) if fs.isdir(match) else [match])
    # Local paths stay plain paths; others get their protocol back (gs://...).
    return files if isinstance(fs, LocalFileSystem) else [fs.unstrip_protocol(f) for f in files]


def expand_paths(spec: str | Sequence[str]) -> list[str]:
    """Files named by a path, directory (recursive, hidden files skipped), glob, comma list or list."""
    items = _split_spec(spec)
    if not items:
        raise UserError(f"no data files given ({spec!r}): set a file, directory or glob")
    files: list[str] = []
    for item in items:
        found = _expand_one(item)
        if not found:
            raise UserError(f"{item!r} matches no files: check the path (a file, a directory or a glob)")
        files.extend(found)
    return list(dict.fromkeys(files))  # drop repeats, keep order


def is_url(path: str) -> bool:
    return "://" in str(path)


def local_path(path: str) -> str | None:
    """The absolute local path of a plain path or file:// URL; None for other filesystems."""
    path = str(path)
    if path.startswith("file://"):
        path = path[len("file://") :]
    elif is_url(path):
        return None
    return os.path.abspath(path)


# Filesystems Orbax writes checkpoints to itself (through TensorStore / etils epath).
CHECKPOINT_PROTOCOLS = ("gs://", "s3://")


def checkpoint_dir(model_path: str, name: str = "checkpoints") -> str:
    """Where Orbax keeps a run's checkpoints (`name`: "best" for the best one): an absolute local
    path or a gs:// (s3://) URL."""
    path = model_path.rstrip("/") + "/" + name
    local = local_path(path)
    if local is not None:
        return local  # Orbax needs absolute local paths; configs usually hold relative ones
    if path.startswith(CHECKPOINT_PROTOCOLS):
        return path
    raise UserError(
        f"model_path {model_path!r}: checkpoints can be written to a local directory, gs:// or s3://, "
        "not this filesystem; point model_path at one of those"
    )
