"""OpenAI's GPT-2 from the Hugging Face Hub: names, downloads (cached, resumable), checksums.

`huggingface_hub` does the transfer (its cache, resume and progress bars; HF_ENDPOINT points it
at a mirror). Every file is then checked against the hub's own hash: the SHA-256 of large
(LFS) files, the git blob SHA-1 of small ones.
"""

from __future__ import annotations

import hashlib
import os
import re

from gpt2train.errors import UserError

REPOS = {"124M": "openai-community/gpt2", "355M": "openai-community/gpt2-medium",
         "774M": "openai-community/gpt2-large", "1558M": "openai-community/gpt2-xl"}
ALIASES = {"117M": "124M", "345M": "355M"}  # the names of OpenAI's first release
MODELS = (*REPOS, *ALIASES)
MODEL_FILES = ("config.json", "model.safetensors")


def canonical(name: str) -> str:
    name = ALIASES.get(name, name)
    if name not in REPOS:
        raise UserError(f"unknown model {name!r}: choose one of {', '.join(REPOS)} (or 117M/345M, "
                        "their old names), 'encoder', or a directory holding a GPT-2 checkpoint")
    return name


def _file_hash_ok(path: str, etag: str) -> bool:
    etag = etag.strip('"').removeprefix("W/").strip('"')
    if re.fullmatch(r"[0-9a-f]{64}", etag):
        digest = hashlib.sha256()
    elif re.fullmatch(r"[0-9a-f]{40}", etag):
        digest = hashlib.sha1()
        digest.update(b"blob %d\0" % os.path.getsize(path))
    else:
        return True  # the server gave no content hash to check against
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest() == etag


def download_file(repo: str, filename: str, cache_dir: str | None = None) -> str:
    """Local path of `filename` from `repo`, downloaded if not cached, checksum verified."""
    import huggingface_hub as hub
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        meta = hub.get_hf_file_metadata(hub.hf_hub_url(repo, filename))
        path = hub.hf_hub_download(repo, filename, cache_dir=cache_dir)
    except (RepositoryNotFoundError, EntryNotFoundError) as e:
        raise UserError(f"{repo}/{filename} is not on the hub ({type(e).__name__}): check the model name") from None
    except Exception as e:  # the HTTP library's connection errors have no common base with OSError
        if not isinstance(e, (LocalEntryNotFoundError, OSError)) and not any(
                word in type(e).__name__ for word in ("Connect", "Timeout", "Network", "Offline")):
            raise
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
        raise UserError(f"cannot download {repo}/{filename} from {endpoint} ({type(e).__name__}): you seem to be "
                        "offline. Connect, set HF_ENDPOINT to a reachable mirror, or pass a local checkpoint "
                        "directory instead of a name") from None
    if meta.etag and not _file_hash_ok(path, meta.etag):
        os.remove(os.path.realpath(path))  # a damaged cache entry must not be reused
        raise UserError(f"{repo}/{filename} failed its checksum after download (expected {meta.etag}): "
                        "run the command again to download it afresh")
    return path


def fetch_model(name: str, cache_dir: str | None = None) -> str:
    """Directory with config.json + model.safetensors of a named GPT-2."""
    repo = REPOS[canonical(name)]
    paths = [download_file(repo, f, cache_dir) for f in MODEL_FILES]
    return os.path.dirname(paths[0])
