"""The Hugging Face Hub: OpenAI's GPT-2 by name or any GPT-2 repository by id, downloaded (cached,
resumable) and checksummed; and a model folder pushed to a repository.

`huggingface_hub` does the transfer (its cache, resume and progress bars; HF_ENDPOINT points it
at a mirror, read when a transfer starts). Every file is then checked against the hub's own
hash: the SHA-256 of large (LFS) files, the git blob SHA-1 of small ones.
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
SHARD_INDEX = "model.safetensors.index.json"
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")  # "distilgpt2", "org/name"


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def is_repo_id(text: str) -> bool:
    return bool(REPO_ID.fullmatch(text)) and ".." not in text


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


def download_file(repo: str, filename: str, cache_dir: str | None = None, *, missing_ok: bool = False) -> str | None:
    """Local path of `filename` from `repo`, downloaded if not cached, checksum verified
    (None for a file the repository does not have, with missing_ok)."""
    import huggingface_hub as hub
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        meta = hub.get_hf_file_metadata(hub.hf_hub_url(repo, filename, endpoint=endpoint()))
        path = hub.hf_hub_download(repo, filename, cache_dir=cache_dir, endpoint=endpoint())
    except RepositoryNotFoundError:
        raise UserError(f"{repo!r} is not a local directory, nor a model on {endpoint()} (if it is private: `hf auth "
                        "login`); check the name or the path") from None
    except EntryNotFoundError as e:
        if missing_ok:
            return None
        raise UserError(f"{repo}/{filename} is not on the hub ({type(e).__name__}): check the model name") from None
    except Exception as e:  # the HTTP library's connection errors have no common base with OSError
        if not isinstance(e, (LocalEntryNotFoundError, OSError)) and not any(
                word in type(e).__name__ for word in ("Connect", "Timeout", "Network", "Offline")):
            raise
        raise UserError(f"cannot download {repo}/{filename} from {endpoint()} ({type(e).__name__}): you seem to be "
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


def fetch_repo(repo: str, cache_dir: str | None = None) -> str:
    """Directory with config.json and the safetensors weights (one file, or an index and its
    shards) of any Hub repository, plus its vocabulary files when it has them."""
    import json
    config = download_file(repo, "config.json", cache_dir)
    with open(config) as f:
        model_type = json.load(f).get("model_type")
    if model_type != "gpt2":
        raise UserError(f"{repo} is a {model_type!r} model, not GPT-2: init_from takes GPT-2 architecture models "
                        "(gpt2, distilgpt2, gpt2-medium, their fine-tunes)")
    if download_file(repo, "model.safetensors", cache_dir, missing_ok=True) is None:
        index = download_file(repo, SHARD_INDEX, cache_dir, missing_ok=True)
        if index is None:
            raise UserError(f"{repo} has no safetensors weights (model.safetensors or {SHARD_INDEX}): only those are "
                            "read; convert pytorch_model.bin with transformers' save_pretrained first")
        with open(index) as f:
            for shard in sorted(set(json.load(f)["weight_map"].values())):
                download_file(repo, shard, cache_dir)
    for name in ("vocab.json", "merges.txt"):
        download_file(repo, name, cache_dir, missing_ok=True)
    return os.path.dirname(config)


def push_folder(folder: str, repo_id: str, message: str, *, private: bool | None = None) -> str:
    """Upload every file of `folder` to the model repository `repo_id` (created if needed) in one
    commit; returns the repository's URL."""
    import huggingface_hub as hub
    from huggingface_hub.errors import HfHubHTTPError

    if not hub.get_token():
        raise UserError(f"pushing to {repo_id} needs a Hugging Face token with write access: run `hf auth login` "
                        "or set HF_TOKEN")
    api = hub.HfApi(endpoint=endpoint())
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model", commit_message=message)
    except HfHubHTTPError as e:
        raise UserError(f"the Hub refused the push to {repo_id} ({str(e).splitlines()[0]}): check the repository "
                        "name and that your token may write to it") from None
    return f"{endpoint()}/{repo_id}"
