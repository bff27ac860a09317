"""The one reader of text: plain files, JSONL files with a "text" field, Parquet files with a text column.

Callers name the text by paths, directories, globs or lists; gpt2train.paths.expand_paths turns
those into the files these functions take. A plain file is one document; each non-blank line
of a `.jsonl` file is one (its "text" field), and so is each row of a `.parquet` file (its "text"
column), read one row group at a time so a large file is never held whole; `text_field` names
another field or column. Compression (.gz, .bz2, .xz, .zst) is inferred
from the file name. Text that is not UTF-8 and JSONL lines without a string "text" field are
UserErrors naming the file (and line); so is a Parquet file without the column.

Readers differ only in what they do with the text: encoding and tokenizer training clean it
as the seed did (`clean_text`: ftfy repairs mojibake, then NFKC); the "text" input and
evaluation tokenize it as it is (`token_documents`), as the seed's text input did.
"""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Iterator, Sequence

import fsspec
import numpy as np

from gpt2train.errors import UserError
from gpt2train.paths import with_retries

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.bz2", ".jsonl.xz", ".jsonl.zst")


def is_jsonl(path: str) -> bool:
    return path.endswith(JSONL_SUFFIXES)


def is_parquet(path: str) -> bool:
    return path.endswith(".parquet")


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


def _jsonl_documents(path: str, field: str) -> Iterator[tuple[str, str]]:
    for number, line in enumerate(_lines(path), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            text = record[field]
        except (json.JSONDecodeError, TypeError, KeyError):
            raise UserError(
                f'{path}, line {number}: expected a JSON object with a "{field}" field: fix the line or remove it'
            ) from None
        if not isinstance(text, str):
            raise UserError(f'{path}, line {number}: "{field}" must be a string, not {type(text).__name__}')
        yield f"{path}:{number}", text


class ParquetText:
    """The text column of one Parquet file, read one row group at a time (pyarrow), remote reads
    retried; a missing or non-text column is a UserError naming the file and the columns it has.
    Safe to share between threads: one file handle seeks and reads for every row group, so reads
    of one file take turns (the input's reader threads read other files meanwhile)."""

    def __init__(self, path: str, field: str = "text"):
        self.path, self.field = path, field
        self._file = None
        self._lock = threading.Lock()
        self.num_row_groups = self._open().num_row_groups

    def _open(self):
        import pyarrow as pa
        import pyarrow.parquet as pq

        def read_footer():
            handle = fsspec.open(self.path, "rb").open()
            try:
                return pq.ParquetFile(handle)
            except pa.ArrowInvalid as e:
                handle.close()
                raise UserError(f"{self.path} is not a Parquet file ({e}): check the path") from None

        try:
            parquet = with_retries(read_footer, self.path)
        except FileNotFoundError:
            raise UserError(f"{self.path} does not exist: check the path") from None
        schema = parquet.schema_arrow
        if self.field not in schema.names:
            raise UserError(f"{self.path} has no column {self.field!r} (its columns: {', '.join(schema.names)}): "
                            'set "text_field" (encode: --text_field) to the column that holds the text')
        kind = schema.field(self.field).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or str(kind) == "string_view"):
            raise UserError(f"{self.path}: column {self.field!r} holds {kind}, not text: "
                            'set "text_field" to the column that holds the text')
        self._file = parquet
        return parquet

    def row_group(self, index: int) -> list[str]:
        """The texts of one row group, in row order; a missing (null) text is an empty one."""
        def read():
            try:
                table = self._file.read_row_group(index, columns=[self.field])
            except Exception:
                self._file = None  # a dropped connection can leave the handle unusable: reopen it
                raise
            return table.column(0).to_pylist()

        def read_reopening():
            if self._file is None:
                self._open()
            return read()

        with self._lock:
            texts = with_retries(read_reopening, f"{self.path}, row group {index}")
        return [text or "" for text in texts]


def _parquet_documents(path: str, field: str) -> Iterator[tuple[str, str]]:
    parquet = ParquetText(path, field)
    for group in range(parquet.num_row_groups):
        for row, text in enumerate(parquet.row_group(group)):
            yield f"{path}:{group}:{row}", text


def iter_documents(files: Sequence[str], text_field: str = "text") -> Iterator[tuple[str, str]]:
    """(name, raw text) of every document in the files, in order; not cleaned."""
    for path in files:
        if is_jsonl(path):
            yield from _jsonl_documents(path, text_field)
        elif is_parquet(path):
            yield from _parquet_documents(path, text_field)
        else:
            yield path, read_text(path)


def token_documents(files: Sequence[str], tokenizer, group: int = 64, text_field: str = "text") -> list[np.ndarray]:
    """Token ids (int32) of every document in the files, in order, text as it is; empty ones are
    left out. Documents are tokenized `group` at a time, which bounds the text held at once."""
    docs: list[np.ndarray] = []
    named = iter_documents(files, text_field)
    while chunk := list(itertools.islice(named, group)):
        ids = tokenizer.encode_batch([text for _, text in chunk])
        docs.extend(np.asarray(i, dtype=np.int32) for i in ids if i)
    return docs
