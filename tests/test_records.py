"""TFRecord/Example codec: TensorFlow-written fixtures, byte-identical writes, damaged files."""

import importlib.util
import json
import pathlib
import struct
import subprocess
import sys

import numpy as np
import pytest

from gpt2train import records
from gpt2train.errors import UserError

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
TF_FILE = FIXTURES / "tf_documents.tfrecords"  # TensorFlow 2.21, deterministic serialization: "hash", "text"
# The same documents as TensorFlow 2.21's default serialization wrote them in a process whose
# protobuf runtime (upb) iterated the map "text" first; gpt2train wrote this order until it sorted the keys.
TF_FILE_TEXT_FIRST = FIXTURES / "tf_documents_text_first.tfrecords"


def expected_documents():
    return [(d["text"], d["hash"].encode()) for d in json.loads((FIXTURES / "tf_documents.json").read_text())]


@pytest.mark.parametrize("path", [TF_FILE, TF_FILE_TEXT_FIRST], ids=["hash-first", "text-first"])
def test_reads_files_written_by_tensorflow(path):
    assert path.read_bytes() != (TF_FILE_TEXT_FIRST if path == TF_FILE else TF_FILE).read_bytes()
    got = list(records.read_documents(str(path)))
    want = expected_documents()
    assert len(got) == len(want)
    for (tokens, name), (want_tokens, want_name) in zip(got, want):
        assert tokens.tolist() == want_tokens
        assert name == want_name


def test_our_files_are_byte_identical_to_tensorflows(tmp_path):
    out = tmp_path / "ours.tfrecords"
    assert records.write_documents(str(out), expected_documents()) == len(expected_documents())
    assert out.read_bytes() == TF_FILE.read_bytes()
    assert not list(tmp_path.glob("*.tmp-*"))  # the temporary name is gone after the rename


_TF_WRITER = """
import json, sys
import tensorflow as tf
docs = json.loads(sys.stdin.read())
with tf.io.TFRecordWriter(sys.argv[1]) as writer:
    for tokens, name in docs:
        feature = {"hash": tf.train.Feature(bytes_list=tf.train.BytesList(value=[name.encode()])),
                   "text": tf.train.Feature(int64_list=tf.train.Int64List(value=tokens))}
        example = tf.train.Example(features=tf.train.Features(feature=feature))
        writer.write(example.SerializeToString(deterministic=True))
print(tf.__version__)
"""


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None,
                    reason="TensorFlow is not installed (not a dependency; pip install tensorflow-cpu to run this)")
def test_byte_identical_to_the_installed_tensorflows_writer(tmp_path):
    """Against TensorFlow itself when it is installed (in its own process: it and JAX need not
    share one), on documents of every size class: varint lengths of 1 to 10 bytes, names of
    any length, empty documents."""
    rng = np.random.default_rng(3)
    docs = [([], ""), ([2**63 - 1, -1, -(2**63)], "int64 extremes"), ([0] * 200, "x" * 300)]
    docs += [(rng.integers(0, 2**rng.integers(1, 62), n).tolist(), f"doc {n} ✓") for n in (1, 17, 128, 5000)]
    theirs = tmp_path / "tf.tfrecords"
    tf = subprocess.run([sys.executable, "-c", _TF_WRITER, str(theirs)], input=json.dumps(docs), capture_output=True,
                        text=True, timeout=300)
    assert tf.returncode == 0, tf.stderr[-2000:]
    records.write_documents(str(tmp_path / "ours.tfrecords"), docs)
    assert (tmp_path / "ours.tfrecords").read_bytes() == theirs.read_bytes(), f"TensorFlow {tf.stdout.strip()}"


def test_unpacked_int64_lists_are_read_too():
    # Example{features{feature{key:"text" value{int64_list{value:5 value:300}}}}}, not packed.
    unpacked = records._varint(8) + records._varint(5) + records._varint(8) + records._varint(300)
    feature = records._field(3, unpacked)
    entry = records._field(1, b"text") + records._field(2, feature)
    tokens, name = records.decode_example(records._field(1, records._field(1, entry)))
    assert tokens.tolist() == [5, 300] and name == b""


def _damaged_copy(tmp_path, offset, value=None, truncate=None):
    data = bytearray(TF_FILE.read_bytes())
    if value is not None:
        data[offset] ^= value
    if truncate is not None:
        data = data[:truncate]
    path = tmp_path / "damaged.tfrecords"
    path.write_bytes(bytes(data))
    return path


def _record_offsets():
    data, offsets, pos = TF_FILE.read_bytes(), [], 0
    while pos < len(data):
        offsets.append(pos)
        (length,) = struct.unpack_from("<Q", data, pos)
        pos += 16 + length
    return offsets


def test_flipped_data_byte_names_file_and_offset(tmp_path):
    third = _record_offsets()[2]
    path = _damaged_copy(tmp_path, third + 14, value=0x40)
    with pytest.raises(UserError, match=rf"damaged.tfrecords: record 2 \(byte offset {third}\) is corrupt: the data"):
        list(records.read_documents(str(path)))
    # Skipping passes over exactly the damaged record and counts it.
    stats = records.ReadStats()
    names = [n for _, n in records.read_documents(str(path), skip_corrupt=True, stats=stats)]
    want = [n for _, n in expected_documents()]
    assert names == want[:2] + want[3:]
    assert (stats.records, stats.skipped) == (len(want) - 1, 1)


def test_truncated_file_and_damaged_length(tmp_path):
    last = _record_offsets()[-1]
    path = _damaged_copy(tmp_path, 0, truncate=last + 20)
    with pytest.raises(UserError, match=rf"record {len(_record_offsets()) - 1} \(byte offset {last}\) is corrupt: the file ends inside a record"):
        list(records.read_documents(str(path)))
    path = _damaged_copy(tmp_path, 3, value=1)
    with pytest.raises(UserError, match=r"record 0 \(byte offset 0\) is corrupt: the length's checksum"):
        list(records.read_documents(str(path)))
    stats = records.ReadStats()
    assert list(records.read_documents(str(path), skip_corrupt=True, stats=stats)) == []
    assert stats.skipped == 1


def test_a_record_that_is_not_an_example_is_named(tmp_path):
    path = tmp_path / "other.tfrecords"
    path.write_bytes(records._frame(b"\x0a\x03abc"))  # a message without a "text" feature
    with pytest.raises(UserError, match=r'other.tfrecords: record 0 .*no int64 feature "text"'):
        list(records.read_documents(str(path)))


def test_remote_filesystems_through_fsspec():
    docs = [(np.arange(n), f"doc{n}") for n in (3, 130, 0)]
    assert records.write_documents("memory://corpus/a.tfrecords", docs) == 3
    got = list(records.read_documents("memory://corpus/a.tfrecords"))
    assert [t.tolist() for t, _ in got] == [list(range(n)) for n in (3, 130, 0)]
