"""Flat token shards: nanoGPT's raw `.bin` files and llm.c's headed shards, read and written.

Two layouts hold one long stream of token ids (documents already joined by <|endoftext|>):

  nanoGPT (train.bin, val.bin): nothing but little-endian uint16 ids.
  llm.c: a header of 256 little-endian int32s, then the ids:
      header[0] magic   20240520 (version 1, uint16 ids) or 20240801 (version 2, uint32 ids)
      header[1] version 1 or 2
      header[2] number of tokens that follow
      header[3:] zero

A file whose first int32 is one of the two magics is an llm.c shard; anything else is read as
nanoGPT's uint16 ids. GPT-2's ids cannot be mistaken for a header: the magics' low halves
(55432 and 55713 as uint16) are past its 50257 ids. Our `encode --format bin` writes llm.c's
layout as its own script does (every document preceded by <|endoftext|>), version 2 only
when the vocabulary does not fit uint16.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import fsspec
import numpy as np

from gpt2train.errors import UserError

HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
MAGIC = {1: 20240520, 2: 20240801}
VERSION_OF_MAGIC = {magic: version for version, magic in MAGIC.items()}
DTYPE = {1: np.dtype("<u2"), 2: np.dtype("<u4")}


@dataclass(frozen=True)
class ShardInfo:
    path: str
    offset: int  # bytes before the first id
    tokens: int
    dtype: np.dtype
    layout: str  # "llm.c v1", "llm.c v2" or "nanoGPT"


def version_for(n_vocab: int) -> int:
    """llm.c's version for a vocabulary: 1 (uint16 ids) when every id fits, else 2 (uint32)."""
    return 1 if n_vocab <= 2**16 else 2


def header(tokens: int, version: int) -> bytes:
    values = np.zeros(HEADER_INTS, dtype="<i4")
    values[:3] = MAGIC[version], version, tokens
    return values.tobytes()


def inspect(path: str) -> ShardInfo:
    """The layout of one shard from its first bytes and size; a bad header names the file."""
    fs, fs_path = fsspec.core.url_to_fs(path)
    try:
        size = int(fs.size(fs_path))
        with fs.open(fs_path, "rb") as f:
            head = f.read(HEADER_BYTES)
    except FileNotFoundError:
        raise UserError(f"{path} does not exist: check data_path") from None
    first = struct.unpack_from("<i", head)[0] if len(head) >= 4 else None
    if first in VERSION_OF_MAGIC:
        if len(head) < HEADER_BYTES:
            raise UserError(f"{path}: an llm.c shard's header is {HEADER_BYTES} bytes but the file has {size}: "
                            "the file is truncated; re-create it")
        _, version, tokens = struct.unpack_from("<3i", head)
        expected = VERSION_OF_MAGIC[first]
        if version != expected:
            raise UserError(f"{path}: llm.c magic {first} goes with version {expected}, but the header says "
                            f"version {version}: the file is damaged or not an llm.c shard; re-create it")
        dtype = DTYPE[version]
        stored = (size - HEADER_BYTES) // dtype.itemsize
        if tokens < 0 or tokens != stored or (size - HEADER_BYTES) % dtype.itemsize:
            raise UserError(f"{path}: the llm.c header counts {tokens} tokens but the file holds {stored} "
                            f"({size} bytes): the file is truncated or damaged; re-create it")
        return ShardInfo(path, HEADER_BYTES, tokens, dtype, f"llm.c v{version}")
    if size % 2:
        raise UserError(f"{path} is neither an llm.c shard (its first int32 {first} is not the magic "
                        f"{MAGIC[1]} or {MAGIC[2]}) nor nanoGPT uint16 tokens (its size {size} is odd): "
                        "point data_path at token shards")
    return ShardInfo(path, 0, size // 2, DTYPE[1], "nanoGPT")


def check_ids(ids: np.ndarray, n_vocab: int, info: ShardInfo) -> None:
    """Every id below n_vocab, or an error naming the file (a wrong file or a wrong n_vocab)."""
    if ids.size and int(ids.max()) >= n_vocab:
        bad = int(ids.max())
        hint = (f"; its first int32 is not an llm.c magic ({MAGIC[1]} or {MAGIC[2]})"
                if info.layout == "nanoGPT" else "")
        raise UserError(f"{info.path} ({info.layout}) holds token id {bad} but n_vocab is {n_vocab}{hint}: "
                        "the file is not token ids of this vocabulary, or n_vocab is wrong")


def write_shard(path: str, ids: np.ndarray, n_vocab: int) -> int:
    """Write ids as an llm.c shard (atomically: a temporary name, then a rename); returns the count."""
    version = version_for(n_vocab)
    ids = np.asarray(ids)
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= n_vocab):
        raise ValueError(f"token ids must lie in [0, {n_vocab}) for {path}")
    fs, fs_path = fsspec.core.url_to_fs(path)
    tmp = f"{fs_path}.tmp-{os.getpid()}"
    with fs.open(tmp, "wb") as f:
        f.write(header(int(ids.size), version))
        f.write(ids.astype(DTYPE[version]).tobytes())
    fs.mv(tmp, fs_path)
    return int(ids.size)
