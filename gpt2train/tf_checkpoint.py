"""Read TensorFlow checkpoints (`model.ckpt.index` + `model.ckpt.data-*`) without TensorFlow.

That is what OpenAI's GPT-2 release is. The index is a LevelDB-style table mapping each
variable name to a BundleEntryProto (dtype, shape, shard, offset, size, crc32c); the data
files hold the raw little-endian tensor bytes. Uncompressed index blocks only (what
TensorFlow writes for checkpoints); tensors are checked against their stored CRC.
"""

from __future__ import annotations

import struct

import fsspec
import numpy as np

from gpt2train.errors import UserError
from gpt2train.records import _fields, _read_varint, masked_crc

_MAGIC = 0xDB4775248B80FB57
_DTYPES = {1: np.float32, 2: np.float64, 3: np.int32, 9: np.int64, 19: np.float16}


def _block_handle(buf, pos: int) -> tuple[int, int, int]:
    offset, pos = _read_varint(buf, pos)
    size, pos = _read_varint(buf, pos)
    return offset, size, pos


class TFCheckpoint:
    def __init__(self, prefix: str):
        self.prefix = prefix
        try:
            with fsspec.open(prefix + ".index", "rb") as f:
                self._index = memoryview(f.read())
        except FileNotFoundError:
            raise UserError(f"{prefix}.index not found: give the checkpoint prefix (e.g. models/124M/model.ckpt)") from None
        self.entries = self._read_table()
        header = self.entries.pop(b"", None)
        self.num_shards = 1
        if header is not None:
            for number, _, value in _fields(header):
                if number == 1:
                    self.num_shards = value
        self._data: dict[int, bytes] = {}

    # ---------------------------------------------------------------- index table
    def _block(self, offset: int, size: int) -> memoryview:
        block = self._index[offset : offset + size]
        kind = self._index[offset + size]
        if kind != 0:
            raise UserError(f"{self.prefix}.index uses compressed blocks (type {kind}), which this reader does not "
                            "support: re-save the checkpoint with TensorFlow or convert it to safetensors")
        (crc,) = struct.unpack_from("<I", self._index, offset + size + 1)
        if masked_crc(bytes(self._index[offset : offset + size + 1])) != crc:
            raise UserError(f"{self.prefix}.index is corrupt (block at byte {offset} fails its checksum)")
        return block

    @staticmethod
    def _entries(block: memoryview):
        (restarts,) = struct.unpack_from("<I", block, len(block) - 4)
        end = len(block) - 4 - 4 * restarts
        pos, key = 0, b""
        while pos < end:
            shared, pos = _read_varint(block, pos)
            unshared, pos = _read_varint(block, pos)
            size, pos = _read_varint(block, pos)
            key = key[:shared] + bytes(block[pos : pos + unshared])
            pos += unshared
            yield key, block[pos : pos + size]
            pos += size

    def _read_table(self) -> dict[bytes, memoryview]:
        buf = self._index
        if len(buf) < 48:
            raise UserError(f"{self.prefix}.index is too short to be a TensorFlow checkpoint index")
        (magic,) = struct.unpack_from("<Q", buf, len(buf) - 8)
        if magic != _MAGIC:
            raise UserError(f"{self.prefix}.index is not a TensorFlow checkpoint index (bad magic number)")
        footer = len(buf) - 48
        _, _, pos = _block_handle(buf, footer)  # metaindex: unused
        index_offset, index_size, _ = _block_handle(buf, pos)
        entries = {}
        for _, handle in self._entries(self._block(index_offset, index_size)):
            offset, size, _ = _block_handle(handle, 0)
            for key, value in self._entries(self._block(offset, size)):
                entries[key] = value
        return entries

    # ---------------------------------------------------------------- tensors
    def names(self) -> list[str]:
        return sorted(k.decode() for k in self.entries)

    def _shard(self, shard: int) -> bytes:
        if shard not in self._data:
            path = f"{self.prefix}.data-{shard:05d}-of-{self.num_shards:05d}"
            try:
                with fsspec.open(path, "rb") as f:
                    self._data[shard] = f.read()
            except FileNotFoundError:
                raise UserError(f"{path} not found: a TensorFlow checkpoint needs its .index and all .data files") from None
        return self._data[shard]

    def tensor(self, name: str) -> np.ndarray:
        entry = self.entries.get(name.encode())
        if entry is None:
            raise KeyError(name)
        dtype, shape, shard, offset, size, crc = 1, [], 0, 0, 0, None
        for number, _, value in _fields(entry):
            if number == 1:
                dtype = value
            elif number == 2:
                shape = [next((v for n, _, v in _fields(dim) if n == 1), 0) for n, _, dim in _fields(value) if n == 2]
            elif number == 3:
                shard = value
            elif number == 4:
                offset = value
            elif number == 5:
                size = value
            elif number == 6:
                (crc,) = struct.unpack("<I", bytes(value))
            elif number == 7:
                raise UserError(f"{self.prefix}: tensor {name!r} is stored in slices, which this reader does not support")
        if dtype not in _DTYPES:
            raise UserError(f"{self.prefix}: tensor {name!r} has TensorFlow dtype {dtype}, which this reader does not support")
        raw = self._shard(shard)[offset : offset + size]
        if len(raw) != size or (crc is not None and masked_crc(raw) != crc):
            raise UserError(f"{self.prefix}: tensor {name!r} is damaged (its bytes fail their checksum)")
        return np.frombuffer(raw, dtype=np.dtype(_DTYPES[dtype]).newbyteorder("<")).reshape(shape)
