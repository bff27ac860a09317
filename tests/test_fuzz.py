"""Generated inputs, never a traceback: configs and command lines, record files, Unicode text.

CI runs the "ci" profile (a bounded number of examples per test, a fixed seed). A long run:

    GPT2TRAIN_FUZZ=long python -m pytest -q -p no:cacheprovider tests/test_fuzz.py

(the "long" profile: 20 times as many examples, new ones every run).
"""

import json
import os
import string

import fsspec
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpt2train import records
from gpt2train.config import ALIASES, FIELDS, PATH_KEYS, Config, load_config
from gpt2train.errors import UserError

EXAMPLES = {"configs": 400, "flags": 300, "records": 300, "frames": 300, "round_trips": 150, "texts": 300}
# The fixtures the tests take (a temporary folder, monkeypatch, capsys) are fine to share between examples.
QUIET_CHECKS = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
settings.register_profile("ci", derandomize=True, deadline=None, database=None, suppress_health_check=QUIET_CHECKS)
settings.register_profile("long", deadline=None, suppress_health_check=QUIET_CHECKS)
PROFILE = os.environ.get("GPT2TRAIN_FUZZ", "ci")
settings.load_profile(PROFILE)
SCALE = 20 if PROFILE == "long" else 1


def put(name: str, data: bytes) -> str:
    """A file in fsspec's in-memory file system (every reader here goes through fsspec): no disk."""
    path = f"memory://fuzz/{name}"
    with fsspec.open(path, "wb") as f:
        f.write(data)
    return path


def examples(kind: str):
    return settings(max_examples=EXAMPLES[kind] * SCALE)


KEYS = [*FIELDS, *ALIASES]
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.integers(-3, 5000),
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                         st.sampled_from(["2", "1e3", "inf", "nan", "true", "", "GPT2", "adam", "float32"]))
json_values = st.one_of(json_scalars, st.lists(json_scalars, max_size=3),
                        st.dictionaries(st.text(max_size=4), json_scalars, max_size=2))
configs = st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=10)), json_values, max_size=8)


@examples("configs")
@given(values=configs)
def test_any_json_config_loads_or_is_a_user_error(values):
    path = put("fuzz.json", json.dumps(values).encode())  # NaN and Infinity as JSON's loaders accept them
    try:
        cfg = load_config(path)
    except UserError as e:
        assert str(e) and "\n" not in str(e).split(":", 1)[0]
        return
    assert isinstance(cfg, Config)
    for name, f in FIELDS.items():  # a config that loads holds every key in its own type
        value, kind = getattr(cfg, name), type(f.default)
        if name in PATH_KEYS:
            assert value is None or isinstance(value, str) or all(isinstance(v, str) for v in value)
        elif kind in (bool, int, str):
            assert type(value) is kind, (name, value)
        elif kind is float:
            assert type(value) is float and np.isfinite(value), (name, value)


@examples("configs")
@given(raw=st.binary(max_size=200))
def test_any_bytes_as_a_config_file_is_a_user_error(raw):
    try:
        load_config(put("fuzz_raw.json", raw))
    except UserError:
        pass


flag_names = st.one_of(st.sampled_from(KEYS), st.text(string.ascii_lowercase + "_", max_size=8))
flag_values = st.one_of(st.sampled_from(["0", "1", "-1", "2", "1e3", "2.5", "inf", "-inf", "nan", "true", "no", "",
                                         "GPT2", "adafactor", "bfloat16", "99999999999999999999", "--", "="]),
                        st.text(max_size=8))
flag_lists = st.lists(st.one_of(
    st.tuples(flag_names, flag_values).map(lambda kv: [f"--{kv[0]}", kv[1]]),
    st.tuples(flag_names, flag_values).map(lambda kv: [f"--{kv[0]}={kv[1]}"]),
    flag_names.map(lambda k: [f"--{k}"]),
    flag_values.map(lambda v: [v]),
), max_size=5).map(lambda parts: [x for part in parts for x in part])


@pytest.fixture(scope="module")
def cli_config(tmp_path_factory):
    from conftest import tiny_config, write_config
    tmp = tmp_path_factory.mktemp("fuzzcli")
    return str(write_config(tmp / "c.json", tiny_config(tmp)))


@examples("flags")
@given(flags=flag_lists, command=st.sampled_from(["train", "seed"]))
def test_any_command_line_exits_0_or_2_without_a_traceback(cli_config, monkeypatch, capsys, flags, command):
    """The real command line up to the start of training (cmd_train is replaced by a stub)."""
    from gpt2train import cli
    monkeypatch.setattr(cli, "cmd_train", lambda cfg: None)
    monkeypatch.setattr(cli, "cmd_generate", lambda cfg, args, **kw: None)
    argv = ["--model", cli_config, *flags]
    main = cli.seed_main if command == "seed" else lambda a: cli.run_main(["train", *a])
    try:
        code = cli.guarded(main, argv)
    except SystemExit as e:  # argparse's own usage errors: one message, exit 2
        code = e.code
    assert code in (0, 2)
    err = capsys.readouterr().err
    assert "Traceback" not in err


def _example(tokens, name) -> bytes:
    return records.encode_example(np.asarray(tokens, dtype=np.int64), name)


@examples("records")
@given(data=st.binary(max_size=400))
def test_any_bytes_as_a_record_file_give_documents_or_an_error_with_an_offset(data):
    path = put("fuzz.tfrecords", data)
    try:
        list(records.read_documents(path, n_vocab=50257))
    except records.CorruptRecord as e:
        assert "byte offset" in str(e) and "record " in str(e)
    stats = records.ReadStats()
    list(records.read_documents(path, skip_corrupt=True, stats=stats, n_vocab=50257))  # never raises


@examples("frames")
@given(payloads=st.lists(st.one_of(st.binary(max_size=60),
                                   st.builds(_example, st.lists(st.integers(-2**63, 2**63 - 1), max_size=5),
                                             st.binary(max_size=5))), min_size=1, max_size=4))
def test_framed_payloads_decode_or_name_their_record(payloads):
    """Frames with good checksums around arbitrary payloads: the Example decoder's turn."""
    path = put("frames.tfrecords", b"".join(records._frame(p) for p in payloads))
    try:
        docs = list(records.read_documents(path, n_vocab=50257))
    except records.CorruptRecord as e:
        assert "byte offset" in str(e) and "record " in str(e)
        return
    assert len(docs) == len(payloads)


def _wire(fields) -> bytes:
    """Serialise [(number, value)]: an int as a varint (wire type 0), bytes as wire type 2."""
    out = b""
    for number, value in fields:
        if isinstance(value, int):
            out += records._varint(number << 3) + records._varint(value)
        else:
            out += records._field(number, value)
    return out


# Messages shaped like an Example (fields 1-3, nested), but with any wire types and values.
messages = st.recursive(
    st.one_of(st.binary(max_size=8), st.sampled_from([b"text", b"hash"])),
    lambda inner: st.lists(st.tuples(st.integers(1, 3), st.one_of(inner, st.integers(0, 2**64 - 1))),
                           max_size=4).map(_wire),
    max_leaves=12)


@examples("frames")
@given(payload=messages)
def test_example_shaped_messages_decode_or_are_named_damaged(payload):
    """Wrong wire types deep inside an Example: once a MemoryError (a varint read as a length of
    bytes) and TypeErrors; now a record error with its offset, or tokens."""
    try:
        docs = list(records.read_documents(put("shaped.tfrecords", records._frame(payload)), n_vocab=50257))
    except records.CorruptRecord as e:
        assert "record 0 (byte offset 0)" in str(e)
        return
    assert len(docs) == 1


@examples("round_trips")
@given(docs=st.lists(st.tuples(st.lists(st.integers(-2**63, 2**63 - 1), max_size=40), st.binary(max_size=20)),
                     max_size=6))
def test_records_round_trip(docs):
    path = "memory://fuzz/round.tfrecords"
    assert records.write_documents(path, [(np.asarray(t, dtype=np.int64), n) for t, n in docs]) == len(docs)
    got = list(records.read_documents(path))
    assert [(t.tolist(), n) for t, n in got] == [(list(t), n) for t, n in docs]


@examples("texts")
@given(text=st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=200))
def test_tokenizer_round_trips_any_unicode(gpt2_tokenizer, text):
    ids = gpt2_tokenizer.encode(text)
    assert all(0 <= i < gpt2_tokenizer.n_vocab for i in ids)
    assert gpt2_tokenizer.decode(ids) == text
