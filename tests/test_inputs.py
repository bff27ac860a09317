import json
import sysconfig
from pathlib import Path
from types import SimpleNamespace

import fsspec
import numpy as np
import pytest

from conftest import ENCODER_DIR
from gpt2train.errors import UserError
from gpt2train.inputs import WindowSource, get_input, register_input
from gpt2train.paths import expand_paths
from gpt2train.tokenizer import load_tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])
N_CTX = 16
BATCH = 4


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(str(ENCODER_DIR))


def _real_text(module: str, n_chars: int) -> str:
    return (STDLIB / f"{module}.py").read_text(encoding="utf-8")[:n_chars]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Five small real documents of uneven length (heads of stdlib modules), 49 windows in all."""
    root = tmp_path_factory.mktemp("corpus")
    heads = [("textwrap", 900), ("shlex", 300), ("fnmatch", 700), ("bisect", 210), ("colorsys", 500)]
    for i, (module, n_chars) in enumerate(heads):
        (root / f"doc{i}.txt").write_text(_real_text(module, n_chars) + " ünïcode ✓", encoding="utf-8")
    return root


def _cfg(corpus, **overrides):
    cfg = dict(
        data_path=str(corpus),
        eval_data_path=str(corpus / "doc*.txt"),
        n_ctx=N_CTX,
        train_batch_size=BATCH,
        eval_batch_size=BATCH,
        seed=1234,
    )
    cfg.update(overrides)
    return SimpleNamespace(**cfg)


def _source(corpus, tok, split="train", **kw) -> WindowSource:
    process = {k: kw.pop(k) for k in ("process_index", "process_count") if k in kw}
    return get_input("text")(_cfg(corpus, **kw), split, tok, **process)


def _docs(corpus, tok):
    return [tok.encode(p.read_text(encoding="utf-8")) for p in sorted(corpus.glob("doc*.txt"))]


def _expected_windows(docs, eot, seed, epoch, shuffle=True):
    """The documented layout, rebuilt from scratch: the windows of one epoch in visiting order."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(docs)) if shuffle else range(len(docs))
    stream = [t for i in order for t in docs[i] + [eot]]
    n_windows = (len(stream) - 1) // N_CTX
    windows = [stream[w * N_CTX : w * N_CTX + N_CTX + 1] for w in range(n_windows)]
    visit = rng.permutation(n_windows) if shuffle else range(n_windows)
    return [windows[w] for w in visit], stream


def _take(source, n):
    return [source.next_batch() for _ in range(n)]


def test_shapes_and_dtype(corpus, tok):
    source = _source(corpus, tok)
    batch = source.next_batch()
    assert batch.shape == (BATCH, N_CTX + 1)
    assert batch.dtype == np.int32
    docs = _docs(corpus, tok)
    assert source.num_windows == (sum(len(d) + 1 for d in docs) - 1) // N_CTX


def test_windows_follow_documented_layout(corpus, tok):
    source = _source(corpus, tok)
    docs = _docs(corpus, tok)
    # Enough batches to cross two epoch boundaries, with leftovers rolling over.
    assert source.num_windows % BATCH
    n_batches = 2 * source.num_windows // BATCH + 2
    rows = [list(r) for b in _take(source, n_batches) for r in b]
    expected = []
    for epoch in range(3):
        windows, stream = _expected_windows(docs, tok.eot_id, 1234, epoch)
        expected += windows
        if epoch == 0:
            # Every window is a contiguous slice of the stream, and the epoch covers it all.
            first = rows[: source.num_windows]
            starts = sorted(_find_slice(stream, r) for r in first)
            assert starts == [w * N_CTX for w in range(source.num_windows)]
    assert rows == expected[: len(rows)]


def _find_slice(stream, row):
    for start in range(len(stream) - len(row) + 1):
        if stream[start : start + len(row)] == row:
            return start
    raise AssertionError("row is not a slice of the stream")


def test_epochs_reshuffle(corpus, tok):
    source = _source(corpus, tok)
    n = source.num_windows
    rows = [list(r) for b in _take(source, 2 * n // BATCH + 1) for r in b]
    first, second = rows[:n], rows[n:2 * n]
    assert first != second  # each epoch reorders the documents and the windows


def test_seed_determines_batches(corpus, tok):
    a = _take(_source(corpus, tok), 5)
    b = _take(_source(corpus, tok), 5)
    c = _take(_source(corpus, tok, seed=99), 5)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_state_restore_reproduces_batches(corpus, tok):
    source = _source(corpus, tok, train_batch_size=8)
    _take(source, 3)
    state = json.loads(json.dumps(source.state()))
    assert set(state) == {"epoch", "index"}
    following = _take(source, 5)  # crosses an epoch boundary with this corpus
    assert source.state()["epoch"] > state["epoch"]
    resumed = _source(corpus, tok, train_batch_size=8)
    resumed.restore(state)
    assert all(np.array_equal(x, y) for x, y in zip(following, _take(resumed, 5)))


def test_restore_rejects_foreign_position(corpus, tok):
    source = _source(corpus, tok)
    with pytest.raises(UserError, match="windows per epoch"):
        source.restore({"epoch": 0, "index": source.num_windows})


def test_eval_is_in_order_and_reset_repeats(corpus, tok):
    source = _source(corpus, tok, split="eval")
    windows, _ = _expected_windows(_docs(corpus, tok), tok.eot_id, 0, 0, shuffle=False)
    n_batches = source.num_windows // BATCH + 2  # wraps around into a second, identical epoch
    first = _take(source, n_batches)
    assert [list(r) for b in first for r in b] == (windows * 2)[: n_batches * BATCH]
    source.reset()
    assert all(np.array_equal(x, y) for x, y in zip(first, _take(source, n_batches)))


def test_close_releases_nothing_and_the_source_reads_on(corpus, tok):
    source, again = _source(corpus, tok), _source(corpus, tok)
    first = _take(source, 3)
    source.close()
    assert source.skipped_records == 0  # text files have no records to skip
    assert all(np.array_equal(x, y) for x, y in zip(first + _take(source, 3), _take(again, 6)))


def test_eval_needs_eval_data_path(corpus, tok):
    with pytest.raises(UserError, match="eval_data_path"):
        _source(corpus, tok, split="eval", eval_data_path=None)


@pytest.mark.parametrize("split", ["train", "eval"])
def test_processes_split_the_global_batch(corpus, tok, split):
    whole = _take(_source(corpus, tok, split), 4)
    parts = [_take(_source(corpus, tok, split, process_index=p, process_count=2), 4) for p in range(2)]
    for step, batch in enumerate(whole):
        p0, p1 = parts[0][step], parts[1][step]
        assert p0.shape == p1.shape == (BATCH // 2, N_CTX + 1)
        assert np.array_equal(p0, batch[0::2]) and np.array_equal(p1, batch[1::2])


def test_batch_must_divide_among_processes(corpus, tok):
    with pytest.raises(UserError, match="train_batch_size"):
        _source(corpus, tok, train_batch_size=3, process_count=2)


def test_corpus_shorter_than_a_window(tmp_path, tok):
    (tmp_path / "tiny.txt").write_text("Hello world")
    with pytest.raises(UserError, match=r"has 3 tokens .* 1025"):
        _source(tmp_path, tok, n_ctx=1024)


def test_unknown_input_lists_registered(corpus, tok):
    with pytest.raises(UserError, match="'text'"):
        get_input("nope")


def test_register_input(corpus, tok):
    @register_input("test-only")
    def factory(cfg, split, tokenizer, *, process_index=0, process_count=1):
        return "made"

    assert get_input("test-only") is factory
    with pytest.raises(ValueError):
        register_input("test-only")(factory)


# ---------------------------------------------------------------- JSONL through the one text reader


@pytest.fixture
def jsonl_corpus(tmp_path):
    texts = [_real_text("textwrap", 400), "", _real_text("shlex", 250) + " ünïcode ✓", _real_text("bisect", 300)]
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(texts)]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(lines[:2] + ["", "  "] + lines[2:]) + "\n", encoding="utf-8")
    return path, [t for t in texts if t]  # blank lines and empty texts give no document


def test_text_input_and_evaluate_read_a_jsonl_file_by_its_text_fields(jsonl_corpus, tok, tmp_path):
    from gpt2train.encode import encode_corpus
    from gpt2train.evaluate import token_stream
    from gpt2train.records import read_documents
    from gpt2train.text_sources import clean_text

    path, texts = jsonl_corpus
    docs = [tok.encode(t) for t in texts]
    windows, stream = _expected_windows(docs, tok.eot_id, 0, 0, shuffle=False)
    source = _source(tmp_path, tok, split="eval", eval_data_path=str(path))
    assert source.num_windows == len(windows)
    assert [list(r) for b in _take(source, len(windows) // BATCH) for r in b] == windows[: len(windows) // BATCH * BATCH]
    got, n_docs = token_stream(str(path), tok)
    assert got.tolist() == stream and n_docs == len(texts)
    # The same documents encode reads (its ftfy cleaning changes nothing in this text).
    assert all(clean_text(t) == t for t in texts)
    encode_corpus(str(path), str(tmp_path / "records"), "c", str(ENCODER_DIR), minimum_size=1, workers=0,
                  progress=False, log=lambda *_: None)
    encoded = [t.tolist() for t, _ in read_documents(str(tmp_path / "records" / "c_0.tfrecords"))]
    assert encoded == docs


def test_bad_jsonl_or_utf8_is_a_clear_error(tmp_path, tok):
    bad_line = tmp_path / "bad.jsonl"
    bad_line.write_text('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(UserError, match=r'bad.jsonl, line 2: expected a JSON object with a "text" field'):
        _source(tmp_path, tok, data_path=str(bad_line))
    for name in ("latin1.jsonl", "latin1.txt"):
        (tmp_path / name).write_bytes(b'{"text": "caf\xe9"}\n')
        with pytest.raises(UserError, match=rf"{name} is not UTF-8 text"):
            _source(tmp_path, tok, data_path=str(tmp_path / name))


# ---------------------------------------------------------------- expand_paths


@pytest.fixture
def tree(tmp_path):
    for rel in ["b.txt", "a.txt", "sub/c.txt", "sub/deeper/d.md", ".hidden", ".git/config", "sub/.e.txt"]:
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(rel)
    return tmp_path


def test_expand_directory(tree):
    names = [str(Path(p).relative_to(tree)) for p in expand_paths(str(tree))]
    assert names == ["a.txt", "b.txt", "sub/c.txt", "sub/deeper/d.md"]


def test_expand_glob_list_and_commas(tree):
    assert expand_paths(str(tree / "*.txt")) == [str(tree / "a.txt"), str(tree / "b.txt")]
    both = [str(tree / "b.txt"), str(tree / "sub" / "c.txt")]
    assert expand_paths(both) == both
    assert expand_paths(",".join(both)) == both
    assert expand_paths([str(tree / "sub"), str(tree / "b.txt")]) == [
        str(tree / "sub" / "c.txt"),
        str(tree / "sub" / "deeper" / "d.md"),
        str(tree / "b.txt"),
    ]


def test_expand_missing(tree):
    missing = str(tree / "nothing*.txt")
    with pytest.raises(UserError, match="nothing"):
        expand_paths([str(tree / "a.txt"), missing])
    with pytest.raises(UserError, match="no-such-dir"):
        expand_paths(str(tree / "no-such-dir"))


def test_fsspec_urls(tok):
    fs = fsspec.filesystem("memory")
    for i, module in enumerate(["textwrap", "shlex"]):
        with fs.open(f"/corpus/doc{i}.txt", "w") as f:
            f.write(_real_text(module, 400))
    assert expand_paths("memory://corpus") == ["memory:///corpus/doc0.txt", "memory:///corpus/doc1.txt"]
    source = _source(Path("unused"), tok, data_path="memory://corpus/*.txt")
    assert source.next_batch().shape == (BATCH, N_CTX + 1)
    fs.rm("/corpus", recursive=True)
