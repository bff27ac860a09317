"""Text -> BPE tokens -> NAME_i.tfrecords (or llm.c token shards NAME_i.bin), in parallel worker processes, resumable.

Documents are taken in a fixed order (sorted inputs, JSONL lines in order) and cut into chunks
of `files_per`; chunk i becomes OUT/NAME_i.tfrecords (format "tfrecords": one record per
document) or OUT/NAME_i.bin (format "bin": an llm.c shard, each document preceded by
<|endoftext|> as llm.c's own encoder writes them; see gpt2train/shards.py), written by one worker under a temporary
name and renamed when complete. A rerun skips every chunk whose file exists, so an interrupted
encode resumes where it stopped. OUT/NAME.encode.json records the settings; a rerun with other
settings is refused rather than mixing two encodings in one dataset.

Held-out documents (by a fraction, chosen by a hash of the document's name, or from separate
inputs) go to OUT/eval/ with the same naming.
"""

from __future__ import annotations

import concurrent.futures as futures
import hashlib
import itertools
import json
import multiprocessing
import os
import posixpath
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from gpt2train import records, shards
from gpt2train.errors import UserError
from gpt2train.paths import check_bucket, expand_paths
from gpt2train.text_sources import clean_text, iter_documents

SETTINGS_VERSION = 1
FORMATS = ("tfrecords", "bin")


@dataclass
class EncodeSummary:
    documents: int = 0  # documents read (this run, resumed files excluded)
    tokens: int = 0  # tokens written
    dropped: int = 0  # documents under minimum_size
    files: int = 0  # files written by this run
    resumed_files: int = 0  # files already complete from an earlier run
    input_bytes: int = 0  # UTF-8 bytes of the text encoded by this run
    seconds: float = 0.0
    eval_files: int = 0
    eval_documents: int = 0
    paths: list[str] = field(default_factory=list)

    @property
    def mb_per_s(self) -> float:
        return self.input_bytes / 1e6 / max(self.seconds, 1e-9)

    def line(self) -> str:
        held = f", {self.eval_documents} held-out documents in {self.eval_files} files" if self.eval_files else ""
        resumed = f" ({self.resumed_files} files already done)" if self.resumed_files else ""
        return (
            f"encoded {self.documents} documents into {self.tokens:,} tokens, dropped {self.dropped} under "
            f"minimum_size, wrote {self.files} files{resumed}{held}; {self.input_bytes / 1e6:.1f} MB in "
            f"{self.seconds:.1f} s = {self.mb_per_s:.2f} MB/s"
        )


# ---------------------------------------------------------------- worker side

_worker_tokenizer = None


def _init_worker(encoder_path: str) -> None:
    global _worker_tokenizer
    from gpt2train.tokenizer import load_tokenizer

    _worker_tokenizer = load_tokenizer(encoder_path)


def _encode_chunk(path: str, docs: list[tuple[str, str]], minimum_size: int,
                  fmt: str = "tfrecords") -> tuple[int, int, int]:
    """Clean, tokenize and write one file; returns (documents, tokens, dropped)."""
    texts = [clean_text(text) for _, text in docs]
    ids = _worker_tokenizer.encode_batch(texts, num_threads=1)
    kept = [(tokens, name) for (name, _), tokens in zip(docs, ids) if len(tokens) >= max(minimum_size, 1)]
    if fmt == "bin":
        eot = _worker_tokenizer.eot_id
        stream = np.concatenate([np.asarray([eot, *tokens], dtype=np.int64) for tokens, _ in kept] or [[]])
        shards.write_shard(path, stream, _worker_tokenizer.n_vocab)
    else:
        records.write_documents(path, kept)
    return len(docs), sum(len(t) for t, _ in kept), len(docs) - len(kept)


# ---------------------------------------------------------------- main side


def _held_out(name: str, fraction: float) -> bool:
    digest = hashlib.sha1(name.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def _check_settings(out: str, name: str, settings: dict) -> None:
    fs, root = fsspec.core.url_to_fs(out)
    path = posixpath.join(root, f"{name}.encode.json")
    try:
        fs.makedirs(root, exist_ok=True)
        if not fs.exists(path):
            with fs.open(path, "w") as f:
                json.dump(settings, f, indent=1)
            return
    except OSError as e:
        raise UserError(f"cannot write to --out {out} ({e.strerror or e}): choose a directory you can write to") from None
    with fs.open(path, "r") as f:
        earlier = {"format": "tfrecords", "text_field": "text", **json.load(f)}  # keys older encodings lack
    earlier.setdefault("encoder_fingerprint", settings["encoder_fingerprint"])  # written before it was recorded
    if earlier != settings:
        changed = sorted(k for k in settings.keys() | earlier.keys() if settings.get(k) != earlier.get(k))
        raise UserError(
            f"{out} already holds an encoding of {name!r} made with other settings ({', '.join(changed)} "
            f"differ): rerun with the same settings to resume it, or choose a new --out or --name"
        )


def check_manifests(files: Sequence[str], tokenizer, key: str) -> None:
    """The records in `files` must have been encoded with `tokenizer`'s vocabulary: compare the
    fingerprint in each NAME.encode.json beside them (or one directory up, for OUT/eval/)."""
    looked: dict[str, bool] = {}  # manifest path -> exists (thousands of files share a few manifests)
    for path in files:
        folder, base = posixpath.split(path)
        prefix = base.rsplit("_", 1)[0]
        for where in (folder, posixpath.dirname(folder)):
            manifest = posixpath.join(where, f"{prefix}.encode.json")
            if manifest in looked:
                if looked[manifest]:
                    break
                continue
            fs, p = fsspec.core.url_to_fs(manifest)
            looked[manifest] = fs.exists(p)
            if not looked[manifest]:
                continue
            with fs.open(p, "r") as f:
                settings = json.load(f)
            saved = settings.get("encoder_fingerprint")
            if saved is not None and saved != tokenizer.fingerprint:
                raise UserError(
                    f"{key}: {path} was encoded with the vocabulary {saved} (encoder_path "
                    f"{settings.get('encoder_path')!r}, see {manifest}) but encoder_path {tokenizer.name!r} holds "
                    f"{tokenizer.fingerprint}: set encoder_path to the one the data was encoded with, or re-encode")
            break


def _chunks(docs: Iterable[tuple[str, str]], size: int) -> Iterator[list[tuple[str, str]]]:
    it = iter(docs)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


class _Writer:
    """Sends chunks to the workers (or encodes in-process with workers=0), bounded in flight."""

    def __init__(self, pool, minimum_size: int, summary: EncodeSummary, progress, fmt: str = "tfrecords"):
        self.pool, self.minimum_size, self.summary, self.progress = pool, minimum_size, summary, progress
        self.fmt = fmt
        self.pending: dict[futures.Future, int] = {}

    def _collect(self, fut: futures.Future, nbytes: int) -> None:
        n_docs, n_tokens, dropped = fut.result()
        self.summary.documents += n_docs
        self.summary.tokens += n_tokens
        self.summary.dropped += dropped
        self.summary.files += 1
        self.progress.update(nbytes)

    def submit(self, path: str, docs: list[tuple[str, str]], nbytes: int) -> None:
        if self.pool is None:
            fut = futures.Future()
            fut.set_result(_encode_chunk(path, docs, self.minimum_size, self.fmt))
            self._collect(fut, nbytes)
            return
        while len(self.pending) >= 2 * self.pool._max_workers:
            done, _ = futures.wait(self.pending, return_when=futures.FIRST_COMPLETED)
            for fut in done:
                self._collect(fut, self.pending.pop(fut))
        self.pending[self.pool.submit(_encode_chunk, path, docs, self.minimum_size, self.fmt)] = nbytes

    def finish(self) -> None:
        for fut in futures.as_completed(list(self.pending)):
            self._collect(fut, self.pending.pop(fut))


def _doc_bytes(docs: list[tuple[str, str]]) -> int:
    return sum(len(text.encode("utf-8", "surrogatepass")) for _, text in docs)


def encode_corpus(
    inputs: str | Sequence[str],
    out: str,
    name: str,
    encoder_path: str,
    *,
    files_per: int = 100_000,
    minimum_size: int = 128,
    workers: int | None = None,
    holdout_fraction: float = 0.0,
    holdout_inputs: str | Sequence[str] | None = None,
    progress: bool = True,
    log=print,
    fmt: str = "tfrecords",
    text_field: str = "text",
) -> EncodeSummary:
    """Encode every document of `inputs` into OUT/NAME_i.tfrecords or .bin (held-out ones into OUT/eval/)."""
    from tqdm import tqdm

    from gpt2train.tokenizer import load_tokenizer

    if files_per < 1:
        raise UserError(f"--files_per {files_per} must be at least 1")
    if minimum_size < 0:
        raise UserError(f"--minimum_size {minimum_size} must be 0 or more")
    if not 0.0 <= holdout_fraction < 1.0:
        raise UserError(f"--holdout_fraction {holdout_fraction} must be in [0, 1)")
    if holdout_fraction and holdout_inputs:
        raise UserError("give either --holdout_fraction or --holdout_input, not both")
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} must be one of {FORMATS}")
    if "/" in name or not name:
        raise UserError(f"--name {name!r} must be a plain file-name prefix")
    tokenizer = load_tokenizer(encoder_path)  # a missing or broken vocabulary fails here, before any work
    check_bucket(out, "--out")  # object stores would create a missing bucket on the first write
    files = expand_paths(inputs)
    held_files = expand_paths(holdout_inputs) if holdout_inputs else []
    settings = {
        "version": SETTINGS_VERSION,
        "inputs": files,
        "holdout_inputs": held_files,
        "encoder_path": encoder_path,
        "files_per": files_per,
        "minimum_size": minimum_size,
        "holdout_fraction": holdout_fraction,
        "format": fmt,
        "text_field": text_field,
        "encoder_fingerprint": tokenizer.fingerprint,  # checked when training on the records
    }
    _check_settings(out, name, settings)
    fs, root = fsspec.core.url_to_fs(out)
    workers = (os.cpu_count() or 1) if workers is None else workers
    summary = EncodeSummary()
    total = sum(fs_size(p) for p in files + held_files)
    start = time.perf_counter()

    def target(split_root: str, index: int) -> str:
        return posixpath.join(split_root, f"{name}_{index}.{fmt}")

    train_root, eval_root = root, posixpath.join(root, "eval")
    if holdout_fraction or held_files:
        fs.makedirs(eval_root, exist_ok=True)

    pool = None
    if workers > 0:
        context = multiprocessing.get_context("spawn")  # safe with threads (tqdm, fsspec) in this process
        pool = futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(encoder_path,))
    else:
        _init_worker(encoder_path)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"encode {name}", disable=not progress)
    writer = _Writer(pool, minimum_size, summary, bar, fmt)
    local = isinstance(fs, LocalFileSystem)
    buffers = {train_root: [], eval_root: []}
    counts = {train_root: 0, eval_root: 0}

    def flush(split_root: str) -> None:
        chunk, buffers[split_root] = buffers[split_root], []
        if not chunk:
            return
        path = target(split_root, counts[split_root])
        counts[split_root] += 1
        nbytes = _doc_bytes(chunk)
        if split_root == eval_root:
            summary.eval_files += 1
            summary.eval_documents += len(chunk)
        summary.paths.append(path if local else fs.unstrip_protocol(path))
        if fs.exists(path):  # complete: files appear only by an atomic rename
            summary.resumed_files += 1
            bar.update(nbytes)
        else:
            summary.input_bytes += nbytes  # MB/s counts the text this run encodes
            writer.submit(path if local else fs.unstrip_protocol(path), chunk, nbytes)  # workers open it by URL

    def route(docs, split_of) -> None:
        for doc in docs:
            split_root = split_of(doc)
            buffers[split_root].append(doc)
            if len(buffers[split_root]) == files_per:
                flush(split_root)

    try:
        if holdout_fraction:
            route(iter_documents(files, text_field),
                  lambda d: eval_root if _held_out(d[0], holdout_fraction) else train_root)
        else:
            route(iter_documents(files, text_field), lambda d: train_root)
            route(iter_documents(held_files, text_field), lambda d: eval_root)
        flush(train_root)
        flush(eval_root)
        writer.finish()
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    summary.seconds = time.perf_counter() - start
    log(summary.line())
    return summary


def fs_size(path: str) -> int:
    fs, p = fsspec.core.url_to_fs(path)
    return int(fs.size(p) or 0)


def summary_dict(summary: EncodeSummary) -> dict:
    return {**asdict(summary), "mb_per_s": summary.mb_per_s}
