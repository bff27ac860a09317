"""Paths that may be local or remote (gs://, s3://, memory://... through fsspec)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from gpt2train.errors import UserError

T = TypeVar("T")


def _split_spec(spec: str | Sequence[str]) -> list[str]:
    items = [spec] if isinstance(spec, str) else list(spec)
    return [part.strip() for item in items for part in item.split(",") if part.strip()]


def _is_hidden(path: str, root: str) -> bool:
    relative = path[len(root) :].strip("/")
    return any(part.startswith(".") for part in relative.split("/"))


def _files_under(fs, directory: str) -> list[str]:
    directory = directory.rstrip("/")
    return sorted(p for p in fs.find(directory) if not _is_hidden(p, directory))


def _matches(fs, path: str, item: str) -> list[str]:
    try:
        if any(c in path for c in "*?["):
            return sorted(fs.glob(path))
        return [path] if fs.exists(path) else []
    except FileNotFoundError:  # a missing repository or bucket; check_bucket names the bucket case
        return []
    except PermissionError:
        raise UserError(f"{item!r}: access is denied: use credentials that may read it, or fix the path") from None
    except OSError as e:
        raise UserError(f"{item!r} cannot be listed ({type(e).__name__}: {str(e)[:200]}): check the path, the "
                        "network and the credentials") from None


def _expand_one(item: str) -> list[str]:
    fs, path = fsspec.core.url_to_fs(item)
    matches = _matches(fs, path, item)
    if not matches:
        check_bucket(item, "the path")  # a missing or refused bucket says so, not just "no files"
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


# Filesystems Orbax writes checkpoints to itself (through TensorStore / etils epath). Orbax 0.12
# turns s3://bucket/x into s3:/bucket/x and refuses it ("Checkpoint path should be absolute").
CHECKPOINT_PROTOCOLS = ("gs://",)
# Object stores whose buckets check_bucket knows.
BUCKET_PROTOCOLS = ("gs://", "s3://")


def checkpoint_dir(model_path: str, name: str = "checkpoints") -> str:
    """Where Orbax keeps a run's checkpoints (`name`: "best" for the best one): an absolute local
    path or a gs:// (s3://) URL."""
    path = model_path.rstrip("/") + "/" + name
    local = local_path(path)
    if local is not None:
        return local  # Orbax needs absolute local paths; configs usually hold relative ones
    if path.startswith(CHECKPOINT_PROTOCOLS):
        return path
    if path.startswith("s3://"):
        raise UserError(f"model_path {model_path!r}: Orbax 0.12 cannot write checkpoints to s3://; use a local "
                        "model_path (or gs://) and copy the run to S3 afterwards; data_path may stay on s3://")
    raise UserError(
        f"model_path {model_path!r}: checkpoints can be written to a local directory or gs://, "
        "not this filesystem; point model_path at one of those"
    )


# ---------------------------------------------------------------- remote reads

# Errors that say the request will never succeed: retrying them only delays the message.
_FINAL = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, UserError)


# Clients of object stores and hubs raise their own types for one dropped connection.
_CLIENT_PACKAGES = {"aiohttp", "aiobotocore", "botocore", "gcsfs", "google", "httpcore", "httpx", "httpx2",
                    "huggingface_hub", "requests", "s3fs", "urllib3"}


def _transient(error: Exception) -> bool:
    return isinstance(error, (OSError, TimeoutError)) or type(error).__module__.split(".")[0] in _CLIENT_PACKAGES


def with_retries(read: Callable[[], T], what: str, *, attempts: int = 6, first_wait: float = 0.5) -> T:
    """`read()`, tried again after a dropped connection or a server error, waiting 0.5, 1, 2, 4, 8 s
    (about 15 s in all, longer than an object store's usual brief outages); the last failure is raised
    as a UserError naming `what`."""
    for attempt in range(attempts):
        try:
            return read()
        except _FINAL:
            raise
        except Exception as e:
            if not _transient(e):
                raise
            if attempt == attempts - 1:
                raise UserError(f"reading {what} failed {attempts} times, the last with {type(e).__name__}: "
                                f"{str(e)[:200]}: check the network and the path") from None
            time.sleep(first_wait * 2**attempt)
    raise AssertionError("unreachable")


def check_bucket(url: str, key: str) -> None:
    """A gs:// or s3:// URL's bucket exists and can be listed, or one UserError naming `key`.

    Object stores answer a missing bucket and a refused one in several ways (404, 403, a bare
    OSError); this turns each into one line before a run writes anything there."""
    if not str(url).startswith(BUCKET_PROTOCOLS):
        return
    fs, path = fsspec.core.url_to_fs(url)
    bucket = path.split("/", 1)[0]
    scheme = str(url).split("://", 1)[0]
    try:
        fs.ls(bucket, detail=False)
    except FileNotFoundError:
        raise UserError(f"{key} {url!r}: the bucket {scheme}://{bucket} does not exist: create it or fix {key}") from None
    except PermissionError:
        raise UserError(f"{key} {url!r}: access to the bucket {scheme}://{bucket} is denied: grant these credentials "
                        f"read and write access, or fix {key}") from None
    except OSError as e:
        text = str(e)
        if "403" in text or "Forbidden" in text or "AccessDenied" in text:
            raise UserError(f"{key} {url!r}: access to the bucket {scheme}://{bucket} is denied ({text[:120]}): "
                            f"grant these credentials access, or fix {key}") from None
        if "404" in text or "NoSuchBucket" in text or "Not Found" in text:
            raise UserError(f"{key} {url!r}: the bucket {scheme}://{bucket} does not exist: create it or fix {key}") from None
        raise UserError(f"{key} {url!r}: the bucket {scheme}://{bucket} cannot be reached ({type(e).__name__}: "
                        f"{text[:120]}): check the network, credentials and {key}") from None


def check_writable(directory: str, what: str) -> None:
    """Create `directory` and write (then remove) a small file in it, so a read-only disk, a
    path under a file or a missing permission is one clear error before any work starts."""
    fs, path = fsspec.core.url_to_fs(directory)
    probe = f"{path.rstrip('/')}/.write-probe-{os.getpid()}-{os.urandom(4).hex()}"
    try:
        fs.makedirs(path, exist_ok=True)
        with fs.open(probe, "wb") as f:
            f.write(b"probe")
        fs.rm(probe)
    except OSError as e:
        raise UserError(f"{what} {directory} is not writable ({os_reason(e)}): point it at a directory "
                        "you can write to (a read-only copy of a run can be read by generate and evaluate, "
                        "not trained further)") from None


def os_reason(e: OSError) -> str:
    """An OSError in a few words: its message and the file it names."""
    reason = e.strerror or str(e) or type(e).__name__
    return f"{reason}: {e.filename}" if e.filename else reason
