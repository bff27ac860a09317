"""Documents from text inputs: files, directories, globs, or JSONL files with a "text" field.

A plain file is one document; each line of a `.jsonl` file is one (its "text" field). Text is
cleaned as the seed cleaned it: ftfy repairs mojibake and the result is NFKC-normalised.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence

import fsspec

from gpt2train.errors import UserError
from gpt2train.paths import expand_paths

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.bz2", ".jsonl.xz", ".jsonl.zst")


def is_jsonl(path: str) -> bool:
    return path.endswith(JSONL_SUFFIXES)


def clean_text(text: str) -> str:
    import ftfy  # imported here: only encoding and tokenizer training need it

    return ftfy.fix_text(text, normalization="NFKC")


def _jsonl_documents(path: str) -> Iterator[tuple[str, str]]:
    with fsspec.open(path, "rt", encoding="utf-8", compression="infer") as f:
        for number, line in enumerate(f, 1):
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


def _file_document(path: str) -> str:
    try:
        with fsspec.open(path, "rt", encoding="utf-8", compression="infer") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e}): convert it to UTF-8") from None


def iter_documents(files: Sequence[str]) -> Iterator[tuple[str, str]]:
    """(name, raw text) of every document in the files, in order; not yet cleaned."""
    for path in files:
        if is_jsonl(path):
            yield from _jsonl_documents(path)
        else:
            yield path, _file_document(path)


def documents(spec: str | Sequence[str]) -> Iterator[tuple[str, str]]:
    """(name, cleaned text) of every document named by a path, directory, glob or list."""
    for name, text in iter_documents(expand_paths(spec)):
        yield name, clean_text(text)
