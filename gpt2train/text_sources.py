"""The one reader of text: plain files, or JSONL files with a "text" field.

Callers name the text by paths, directories, globs or lists; gpt2train.paths.expand_paths turns
those into the files these functions take. A plain file is one document; each non-blank line
of a `.jsonl` file is one (its "text" field). Compression (.gz, .bz2, .xz, .zst) is inferred
from the file name. Text that is not UTF-8 and JSONL lines without a string "text" field are
UserErrors naming the file (and line).

Readers differ only in what they do with the text: encoding and tokenizer training clean it
as the seed did (`clean_text`: ftfy repairs mojibake, then NFKC); the "text" input and
evaluation tokenize it as it is (`token_documents`), as the seed's text input did.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator, Sequence

import fsspec
import numpy as np

from gpt2train.errors import UserError

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.bz2", ".jsonl.xz", ".jsonl.zst")


def is_jsonl(path: str) -> bool:
    return path.endswith(JSONL_SUFFIXES)


def clean_text(text: str) -> str:
    import ftfy  # imported here: only encoding and tokenizer training need it

    return ftfy.fix_text(text, normalization="NFKC")


def _not_utf8(path: str, error: UnicodeDecodeError) -> UserError:
    return UserError(f"{path} is not UTF-8 text ({error}): convert it to UTF-8")


def read_text(path: str) -> str:
    """The whole text of one file (a local path or fsspec URL)."""
    try:
        with fsspec.open(path, "rt", encoding="utf-8", compression="infer") as f:
            return f.read()
    except FileNotFoundError:
        raise UserError(f"{path} does not exist: check the path") from None
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e) from None


def _lines(path: str) -> Iterator[str]:
    try:
        with fsspec.open(path, "rt", encoding="utf-8", compression="infer") as f:
            yield from f
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e) from None


def _jsonl_documents(path: str) -> Iterator[tuple[str, str]]:
    for number, line in enumerate(_lines(path), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            text = record["text"]
        except (json.JSONDecodeError, TypeError, KeyError):
            raise UserError(
                f'{path}, line {number}: expected a JSON object with a "text" field: fix the line or remove it'
            ) from None
        if not isinstance(text, str):
            raise UserError(f'{path}, line {number}: "text" must be a string, not {type(text).__name__}')
        yield f"{path}:{number}", text


def iter_documents(files: Sequence[str]) -> Iterator[tuple[str, str]]:
    """(name, raw text) of every document in the files, in order; not cleaned."""
    for path in files:
        if is_jsonl(path):
            yield from _jsonl_documents(path)
        else:
            yield path, read_text(path)


def token_documents(files: Sequence[str], tokenizer, group: int = 64) -> list[np.ndarray]:
    """Token ids (int32) of every document in the files, in order, text as it is; empty ones are
    left out. Documents are tokenized `group` at a time, which bounds the text held at once."""
    docs: list[np.ndarray] = []
    named = iter_documents(files)
    while chunk := list(itertools.islice(named, group)):
        ids = tokenizer.encode_batch([text for _, text in chunk])
        docs.extend(np.asarray(i, dtype=np.int32) for i in ids if i)
    return docs
