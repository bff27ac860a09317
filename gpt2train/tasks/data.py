"""The tasks' data files: a local copy (--task_data), the Hugging Face Hub, or the original URL;
cached, checked by SHA-256, with a progress bar.

Hub files go through `huggingface_hub` (its cache, resume and progress bars; HF_ENDPOINT points
it at a mirror) and are checked against the hub's own content hash. Files that live at their
original URL (HellaSwag on GitHub, enwik8 on its author's site) are fetched with the standard
library into the cache (GPT2TRAIN_TASK_CACHE, else ~/.cache/gpt2train/tasks); GPT2TRAIN_TASK_MIRROR
replaces the scheme and host with a mirror's (MIRROR/HOST/PATH). Each file is then compared with
the SHA-256s the registry knows: the canonical file's and the project's own fixture's
(tests/fixtures/tasks), so a result says which data it came from.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from ..errors import UserError

MIRROR_ENV = "GPT2TRAIN_TASK_MIRROR"
CACHE_ENV = "GPT2TRAIN_TASK_CACHE"


@dataclass(frozen=True)
class DataFile:
    """One file a task reads. `local_names` are the names it may have in a --task_data directory
    (the first is the canonical one); exactly one of hub (repo, path) and url says where it lives."""

    local_names: tuple[str, ...]
    hub: tuple[str, str] | None = None
    url: str | None = None
    sha256: str | None = None          # the canonical file's, where known
    fixture_sha256: tuple[str, ...] = ()  # tests/fixtures/tasks' stand-ins (each local name's)

    @property
    def source(self) -> str:
        if self.hub:
            endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
            return f"{endpoint}/datasets/{self.hub[0]}/resolve/main/{self.hub[1]}"
        return self.url


@dataclass(frozen=True)
class Fetched:
    path: str
    sha256: str
    kind: str  # "canonical", "fixture" or "unpinned" (a local copy whose hash matches neither)


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _classify(file: DataFile, path: str, *, downloaded: bool) -> Fetched:
    digest = sha256_of(path)
    if digest in file.fixture_sha256:
        return Fetched(path, digest, "fixture")
    if file.sha256 is None or digest == file.sha256:
        return Fetched(path, digest, "canonical" if file.sha256 else "unpinned")
    if downloaded:
        os.remove(path)  # a damaged download must not be reused
        raise UserError(f"{file.source} failed its checksum (SHA-256 {digest}, expected {file.sha256}): "
                        "run the command again to download it afresh")
    return Fetched(path, digest, "unpinned")


def _offline(file: DataFile, task: str, reason: str) -> UserError:
    return UserError(f"cannot download {task}'s data ({reason}): download {file.source} and put it in a "
                     f"directory as {file.local_names[0]}, then pass --task_data DIRECTORY (config key task_data)")


def local_copy(file: DataFile, task: str, task_data: str) -> str:
    """The file in a --task_data directory (or task_data itself, when it is a file)."""
    if os.path.isfile(task_data):
        return task_data
    if not os.path.isdir(task_data):
        raise UserError(f"--task_data {task_data} does not exist: give a directory holding the tasks' files")
    for name in file.local_names:
        for candidate in (os.path.join(task_data, name), os.path.join(task_data, os.path.basename(name))):
            if os.path.isfile(candidate):
                return candidate
    raise UserError(f"{task} needs {file.local_names[0]} in --task_data {task_data} and it is not there: "
                    f"download {file.source} into that directory")


def _download_hub(file: DataFile, task: str) -> tuple[str, bool]:
    import huggingface_hub as hub
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    from ..hub import _file_hash_ok  # the same content-hash check as the model downloads

    repo, filename = file.hub
    try:
        meta = hub.get_hf_file_metadata(hub.hf_hub_url(repo, filename, repo_type="dataset"))
        path = hub.hf_hub_download(repo, filename, repo_type="dataset")
    except (RepositoryNotFoundError, EntryNotFoundError) as e:
        raise UserError(f"{repo}/{filename} is not on the hub ({type(e).__name__}): pass --task_data with a "
                        f"local copy of {file.local_names[0]}") from None
    except Exception as e:  # the HTTP library's connection errors share no base with OSError
        if not isinstance(e, (LocalEntryNotFoundError, OSError)) and not any(
                word in type(e).__name__ for word in ("Connect", "Timeout", "Network", "Offline")):
            raise
        raise _offline(file, task, f"{type(e).__name__}; offline?") from None
    if meta.etag and not _file_hash_ok(path, meta.etag):
        os.remove(os.path.realpath(path))
        raise UserError(f"{repo}/{filename} failed its checksum after download (expected {meta.etag}): "
                        "run the command again to download it afresh")
    return path, True


def cache_dir() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "gpt2train", "tasks")


def _download_url(file: DataFile, task: str) -> tuple[str, bool]:
    from tqdm.auto import tqdm

    parts = urllib.parse.urlsplit(file.url)
    target = os.path.join(cache_dir(), parts.netloc, parts.path.lstrip("/"))
    if os.path.isfile(target):
        return target, False  # cached: checked against the registry again by the caller
    mirror = os.environ.get(MIRROR_ENV)
    url = f"{mirror.rstrip('/')}/{parts.netloc}{parts.path}" if mirror else file.url
    os.makedirs(os.path.dirname(target), exist_ok=True)
    partial = target + ".part"
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=os.path.basename(target), leave=False) as bar:
                for block in iter(lambda: response.read(1 << 20), b""):
                    out.write(block)
                    bar.update(len(block))
    except urllib.error.HTTPError as e:
        raise UserError(f"{url} answered HTTP {e.code}: pass --task_data with a local copy of "
                        f"{file.local_names[0]}") from None
    except (urllib.error.URLError, OSError) as e:
        raise _offline(file, task, f"{getattr(e, 'reason', e)}; offline?") from None
    os.replace(partial, target)  # only a whole file enters the cache
    return target, True


def fetch(file: DataFile, task: str, task_data: str | None = None) -> Fetched:
    """A local path of the file, its SHA-256, and whether it is the canonical file or the fixture."""
    if task_data:
        return _classify(file, local_copy(file, task, task_data), downloaded=False)
    path, downloaded = _download_hub(file, task) if file.hub else _download_url(file, task)
    return _classify(file, path, downloaded=not file.hub)  # the hub checked its own hash
