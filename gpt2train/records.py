"""TFRecord files of tf.train.Example documents, read and written without TensorFlow.

The layout is the seed's: one Example per document with an int64-list feature "text" (the
document's token ids) and a bytes feature "hash" (its name). A TFRecord file is a sequence of

    uint64 length (little-endian) | uint32 masked crc32c(length) | data | uint32 masked crc32c(data)

Only the two fields of Example we use are decoded; the protobuf wire format is small enough
to write by hand, which keeps TensorFlow and protobuf out of the dependencies.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import fsspec
import google_crc32c
import numpy as np

from gpt2train.errors import UserError

_MASK_DELTA = 0xA282EAD8
_HEADER = 12  # length + its crc
_FOOTER = 4  # data crc


def masked_crc(data: bytes) -> int:
    crc = google_crc32c.value(bytes(data))
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


# ---------------------------------------------------------------- protobuf wire format


def _varint(value: int) -> bytes:
    value &= 0xFFFFFFFFFFFFFFFF  # negative int64s are ten-byte varints
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _packed_varints(values: np.ndarray) -> bytes:
    """Varints of many int64s at once: 7-bit groups, low first, high bit set on all but the last."""
    values = np.asarray(values, dtype=np.int64).view(np.uint64)
    if not len(values):
        return b""
    shifts = np.arange(10, dtype=np.uint64) * np.uint64(7)
    groups = ((values[:, None] >> shifts) & np.uint64(0x7F)).astype(np.uint8)  # [n, 10]
    lengths = 1 + sum((values >= np.uint64(1 << (7 * k))).astype(np.int64) for k in range(1, 10))
    keep = np.arange(10)[None, :] < lengths[:, None]
    more = np.arange(10)[None, :] < (lengths - 1)[:, None]
    groups[more] |= 0x80
    return groups[keep].tobytes()


def encode_example(tokens: Sequence[int] | np.ndarray, name: bytes | str = b"") -> bytes:
    """Serialise Example{features{"hash": bytes_list[name], "text": int64_list[tokens]}}."""
    name = name.encode() if isinstance(name, str) else name
    hash_feature = _field(1, _field(1, name))  # Feature.bytes_list = BytesList{value}
    ids = np.asarray(tokens, dtype=np.int64)
    text_feature = _field(3, _field(1, _packed_varints(ids)) if len(ids) else b"")  # Feature.int64_list
    # The map's entries in key order, as protobuf's deterministic serialization writes them
    # (TensorFlow 2.21's SerializeToString(deterministic=True) gives these bytes). A default
    # serialization leaves the order to the protobuf runtime (upb wrote "text" first, as this
    # writer did before); decode_example reads either.
    entries = _field(1, _field(1, b"hash") + _field(2, hash_feature)) + _field(
        1, _field(1, b"text") + _field(2, text_feature)
    )
    return _field(1, entries)  # Example.features


class _Malformed(ValueError):
    pass


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise _Malformed("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _fields(buf: memoryview) -> Iterator[tuple[int, int, object]]:
    """(field number, wire type, value) of a message; value is an int or a memoryview."""
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos)
        elif wire == 2:
            size, pos = _read_varint(buf, pos)
            if pos + size > len(buf):
                raise _Malformed("field runs past the end of its message")
            value, pos = buf[pos : pos + size], pos + size
        elif wire == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 5:
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            raise _Malformed(f"unsupported wire type {wire}")
        yield number, wire, value


def _unpack_varints(buf: memoryview) -> np.ndarray:
    """Packed varints decoded all at once (documents hold thousands of ids)."""
    raw = np.frombuffer(buf, dtype=np.uint8)
    if not len(raw) or raw.max() < 0x80:
        return raw.astype(np.int64)
    if raw[-1] >= 0x80:
        raise _Malformed("truncated varint")
    ends = np.flatnonzero(raw < 0x80)
    starts = np.concatenate([[0], ends[:-1] + 1])
    lengths = ends - starts + 1
    if lengths.max() > 10:
        raise _Malformed("varint longer than 10 bytes")
    values = np.zeros(len(ends), dtype=np.uint64)
    for k in range(int(lengths.max())):
        rows = np.flatnonzero(lengths > k)
        values[rows] |= (raw[starts[rows] + k] & np.uint8(0x7F)).astype(np.uint64) << np.uint64(7 * k)
    return values.view(np.int64)


def _int64_list(buf: memoryview) -> np.ndarray:
    parts = []
    for number, wire, value in _fields(buf):
        if number == 1 and wire == 2:
            parts.append(_unpack_varints(value))  # packed (what TF writes)
        elif number == 1 and wire == 0:
            parts.append(np.array([value - (1 << 64) if value >= 1 << 63 else value], dtype=np.int64))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _submessages(buf: memoryview, wanted: tuple[int, ...]) -> Iterator[tuple[int, memoryview]]:
    """(field number, bytes) of the `wanted` fields of a message, each a message or bytes (wire
    type 2), as at every level of an Example above the int64 list; other fields are skipped, as
    protobuf does, but a wanted field of another wire type is a damaged record."""
    for number, wire, value in _fields(buf):
        if number not in wanted:
            continue
        if wire != 2:
            raise _Malformed(f"field {number} has wire type {wire} where a message belongs")
        yield number, value


def decode_example(data: bytes | memoryview) -> tuple[np.ndarray, bytes]:
    """(token ids, name) of a serialised Example; a missing "text" is an error, "hash" optional."""
    tokens, name = None, b""
    for _, features in _submessages(memoryview(data), (1,)):
        for _, entry in _submessages(features, (1,)):
            key, feature = b"", memoryview(b"")
            for n, v in _submessages(entry, (1, 2)):
                if n == 1:
                    key = bytes(v)
                elif n == 2:
                    feature = v
            for kind, values in _submessages(feature, (1, 3)):
                if key == b"text" and kind == 3:
                    tokens = _int64_list(values)
                elif key == b"hash" and kind == 1:
                    name = b"".join(bytes(v) for _, v in _submessages(values, (1,)))
            if key == b"text" and tokens is None:
                tokens = np.zeros(0, dtype=np.int64)
    if tokens is None:
        raise _Malformed('the Example has no int64 feature "text"')
    return tokens, name


# ---------------------------------------------------------------- files


class CorruptRecord(UserError):
    pass


@dataclass
class ReadStats:
    records: int = 0
    skipped: int = 0  # corrupt records passed over with skip_corrupt (out-of-range ids included)
    out_of_range: int = 0  # of those, records holding token ids outside [0, n_vocab)


def _frame(payload: bytes) -> bytes:
    length = struct.pack("<Q", len(payload))
    return length + struct.pack("<I", masked_crc(length)) + payload + struct.pack("<I", masked_crc(payload))


def iter_records(path: str, *, skip_corrupt: bool = False, stats: ReadStats | None = None) -> Iterator[bytes]:
    """Raw record payloads of a TFRecord file, both CRCs checked (see iter_frames)."""
    for _, _, payload in iter_frames(path, skip_corrupt=skip_corrupt, stats=stats):
        yield payload


def iter_frames(path: str, *, skip_corrupt: bool = False,
                stats: ReadStats | None = None) -> Iterator[tuple[int, int, bytes]]:
    """(record number in the file, byte offset, payload) of every record, both CRCs checked.

    A damaged record raises CorruptRecord naming the file, record and byte offset; with
    skip_corrupt, a record whose data CRC fails is skipped and counted, while a damaged length
    or a truncated tail ends the file (the frame boundaries after it cannot be trusted).
    """
    stats = stats if stats is not None else ReadStats()
    with fsspec.open(path, "rb") as f:
        data = f.read()
    view, pos, number = memoryview(data), 0, 0

    def bad(why: str, offset: int, recoverable: bool) -> bool:
        if not skip_corrupt:
            raise CorruptRecord(
                f"{path}: record {number} (byte offset {offset}) is corrupt: {why}. Re-create the file "
                'or set "skip_corrupt_records": true to skip damaged records'
            )
        stats.skipped += 1
        return recoverable

    while pos < len(view):
        if pos + _HEADER > len(view):
            bad(f"the file ends inside a record header ({len(view) - pos} bytes left)", pos, False)
            return
        (length,) = struct.unpack_from("<Q", view, pos)
        (length_crc,) = struct.unpack_from("<I", view, pos + 8)
        if masked_crc(view[pos : pos + 8]) != length_crc:
            bad("the length's checksum does not match", pos, False)
            return
        end = pos + _HEADER + length + _FOOTER
        if end > len(view):
            bad(f"the file ends inside a record of {length} bytes", pos, False)
            return
        payload = view[pos + _HEADER : pos + _HEADER + length]
        (data_crc,) = struct.unpack_from("<I", view, pos + _HEADER + length)
        if masked_crc(payload) != data_crc:
            bad("the data's checksum does not match", pos, True)
        else:
            stats.records += 1
            yield number, pos, bytes(payload)
        pos, number = end, number + 1


def read_documents(
    path: str, *, skip_corrupt: bool = False, stats: ReadStats | None = None, n_vocab: int | None = None
) -> Iterator[tuple[np.ndarray, bytes]]:
    """(token ids, name) of every document in a file. With n_vocab, a document holding an id
    outside [0, n_vocab) is an error naming the file, record and offset (or skipped and counted)."""
    stats = stats if stats is not None else ReadStats()
    for number, offset, payload in iter_frames(path, skip_corrupt=skip_corrupt, stats=stats):
        try:
            tokens, name = decode_example(payload)
        except _Malformed as e:
            if not skip_corrupt:
                raise CorruptRecord(
                    f"{path}: record {number} (byte offset {offset}) is not a tf.train.Example of the expected "
                    f'layout ({e}): the file was written by another tool; re-encode it or set "skip_corrupt_records": true'
                ) from None
            stats.skipped += 1
            continue
        if n_vocab is not None and len(tokens) and (tokens.min() < 0 or tokens.max() >= n_vocab):
            if not skip_corrupt:
                bad = int(tokens.min()) if tokens.min() < 0 else int(tokens.max())
                raise CorruptRecord(
                    f"{path}: record {number} (byte offset {offset}) holds token id {bad}, outside the vocabulary's "
                    f"[0, {n_vocab}): the file was encoded with another vocabulary; re-encode it with encoder_path's, "
                    'or set "skip_corrupt_records": true to skip such records'
                )
            stats.skipped += 1
            stats.out_of_range += 1
            continue
        yield tokens, name


def write_documents(path: str, documents: Iterator[tuple[Sequence[int], bytes | str]] | list) -> int:
    """Write (tokens, name) documents to a TFRecord file atomically; returns the count."""
    count = 0
    fs, fs_path = fsspec.core.url_to_fs(path)
    tmp = f"{fs_path}.tmp-{os.getpid()}"
    with fs.open(tmp, "wb") as f:
        for tokens, name in documents:
            f.write(_frame(encode_example(tokens, name)))
            count += 1
    fs.mv(tmp, fs_path)
    return count
