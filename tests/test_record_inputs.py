"""The .tfrecords inputs: windows inside their groups, epochs, hosts, resume, mixtures."""

import numpy as np
import pytest

from conftest import tiny_config
from gpt2train import records
from gpt2train.errors import UserError
from gpt2train.inputs import get_input
from gpt2train.inputs.prefetch import Prefetched
from gpt2train.inputs.tfrecords import MixedWindows, RecordWindows, file_groups

EOT = 9999
N_CTX = 16


def doc_tokens(file, doc, length):
    """Token t of document d in file f is f*1000 + d*50 + t: any token names its document."""
    return np.arange(length) + file * 1000 + doc * 50


def write_files(tmp_path, n_files=4, docs_per=6, lengths=(20, 30, 45)):
    paths = []
    for f in range(n_files):
        docs = [(doc_tokens(f, d, lengths[(f + d) % len(lengths)]), f"f{f}d{d}") for d in range(docs_per)]
        path = tmp_path / f"c_{f}.tfrecords"
        records.write_documents(str(path), docs)
        paths.append(str(path))
    return paths


def window_docs(window):
    """(file, doc) of every token of a window, None for <|endoftext|>; checks contiguity."""
    out = []
    for a, b in zip(window[:-1], window[1:]):
        if a != EOT and b != EOT:
            assert b == a + 1, f"window jumps inside a document: {window}"
    for t in window:
        out.append(None if t == EOT else (int(t) // 1000, int(t) % 1000 // 50))
    return out


def test_file_groups_stitch_and_absorb_short_groups():
    docs = [np.full(n, i) for i, n in enumerate([3, 3, 10, 1, 1])]
    groups = file_groups(docs, EOT, stitch=2, window=9)
    # [d0 d1] is 8 < 9 tokens, so it absorbs [d2 d3]; the short tail [d4] joins the last group.
    assert [g.tolist() for g in groups] == [[0] * 3 + [EOT] + [1] * 3 + [EOT] + [2] * 10 + [EOT] + [3, EOT, 4, EOT]]
    assert file_groups(docs[:2], EOT, stitch=1, window=100) == []


def test_windows_stay_in_their_group_and_cover_every_document(tmp_path):
    files = write_files(tmp_path, lengths=(40,))  # every document alone fills a window
    src = RecordWindows(files, EOT, N_CTX, 4, stitch=1, seed=3)
    seen = set()
    for _ in range(6):  # 4 files x 6 documents = 24 windows = one epoch
        batch = src.next_batch()
        assert batch.shape == (4, N_CTX + 1) and batch.dtype == np.int32
        for window in batch:
            docs = {d for d in window_docs(window) if d is not None}
            assert len(docs) == 1  # stitch 1: one document per group
            seen |= docs
    assert seen == {(f, d) for f in range(4) for d in range(6)}
    assert src.state() == {"epoch": 0, "file": 3, "window": 6}
    src.next_batch()
    assert src.state()["epoch"] == 1


def test_stitched_windows_span_only_consecutive_documents_of_one_file(tmp_path):
    files = write_files(tmp_path, lengths=(5, 7, 9))  # short documents: windows must cross them
    src = RecordWindows(files, EOT, N_CTX, 8, stitch=3, seed=0)
    crossing = 0
    for _ in range(10):
        for window in src.next_batch():
            docs = [d for d in window_docs(window) if d is not None]
            assert len({f for f, _ in docs}) == 1  # one file
            distinct = list(dict.fromkeys(docs))
            crossing += len(distinct) > 1
            for a, b in zip(window[:-1], window[1:]):  # a document ends exactly where <|endoftext|> comes
                if b == EOT:
                    assert a != EOT
    assert crossing > 0


def test_two_hosts_read_disjoint_files_and_the_same_rows_per_step(tmp_path):
    files = write_files(tmp_path)
    hosts = [RecordWindows(files, EOT, N_CTX, 4, stitch=2, process_index=p, process_count=2) for p in (0, 1)]
    seen = [set(), set()]
    for _ in range(5):
        for p, host in enumerate(hosts):
            batch = host.next_batch()
            assert batch.shape == (2, N_CTX + 1)
            seen[p] |= {f for w in batch for f, _ in filter(None, window_docs(w))}
    assert seen[0] and seen[1] and not seen[0] & seen[1] and seen[0] | seen[1] == {0, 1, 2, 3}
    with pytest.raises(UserError, match="4 files but there are 5 hosts"):
        RecordWindows(files, EOT, N_CTX, 5, stitch=2, process_index=0, process_count=5)


def test_resume_reproduces_the_batch_sequence_with_and_without_prefetch(tmp_path):
    files = write_files(tmp_path)
    make = lambda: RecordWindows(files, EOT, N_CTX, 3, stitch=2, seed=5)  # noqa: E731
    src = make()
    run = [src.next_batch() for _ in range(20)]
    for wrap in (lambda s: s, lambda s: Prefetched(s, 3)):
        first = wrap(make())
        for _ in range(7):
            first.next_batch()
        saved = first.state()
        if isinstance(first, Prefetched):
            first.close()
        resumed = wrap(make())
        resumed.restore(saved)
        np.testing.assert_array_equal(np.stack([resumed.next_batch() for _ in range(13)]), np.stack(run[7:]))
        if isinstance(resumed, Prefetched):
            resumed.close()


def test_mixture_follows_its_weights_and_resumes(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = write_files(tmp_path / "a")
    b = [str(tmp_path / "b" / "long_0.tfrecords")]
    records.write_documents(b[0], [(np.arange(100) + 900_000, "long")])
    make = lambda: MixedWindows([RecordWindows(a, EOT, N_CTX, 10, stitch=2), RecordWindows(b, EOT, N_CTX, 10, stitch=1)],  # noqa: E731
                                [0.3, 0.7], 10, seed=1)
    mix = make()
    batches = [mix.next_batch() for _ in range(40)]
    long_share = np.mean([w[0] >= 900_000 for batch in batches for w in batch])
    assert 0.6 < long_share < 0.8
    again = make()
    for _ in range(15):
        again.next_batch()
    saved = again.state()
    resumed = make()
    resumed.restore(saved)
    np.testing.assert_array_equal(resumed.next_batch(), batches[15])


def test_registered_inputs_from_a_config(tmp_path, gpt2_tokenizer):
    files = write_files(tmp_path)
    long = tmp_path / "long"
    long.mkdir()
    records.write_documents(str(long / "l_0.tfrecords"), [(np.arange(200) % 50000, "l")])
    cfg = tiny_config(tmp_path, n_ctx=N_CTX, data_path=str(tmp_path / "c_*.tfrecords"), eval_data_path=files[0],
                      input="tfrecords", minimum_size=8, long_data_path=str(long))
    src = get_input("tfrecords")(cfg, "train", gpt2_tokenizer)
    assert isinstance(src, RecordWindows) and src._stitch == 3  # ceil(17 / 8)
    assert get_input("openwebtext")(cfg, "train", gpt2_tokenizer)._stitch == 42
    biased = get_input("openwebtext_longbiased")(cfg, "train", gpt2_tokenizer)
    assert isinstance(biased, MixedWindows) and biased.next_batch().shape == (4, N_CTX + 1)
    assert get_input("openwebtext_long")(cfg, "eval", gpt2_tokenizer).next_batch().shape == (4, N_CTX + 1)
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("not records")
    with pytest.raises(UserError, match="holds no .tfrecords files"):
        get_input("tfrecords")(cfg.replace(data_path=str(tmp_path / "text")), "train", gpt2_tokenizer)


def test_corrupt_records_stop_or_are_skipped(tmp_path):
    files = write_files(tmp_path, lengths=(40,))
    data = bytearray(open(files[1], "rb").read())
    data[30] ^= 0xFF
    open(files[1], "wb").write(bytes(data))
    src = RecordWindows(files, EOT, N_CTX, 4, stitch=1, shuffle=False)
    with pytest.raises(UserError, match=r"c_1.tfrecords: record 0 \(byte offset 0\) is corrupt"):
        for _ in range(6):
            src.next_batch()
    src = RecordWindows(files, EOT, N_CTX, 4, stitch=1, shuffle=False, skip_corrupt=True)
    for _ in range(6):
        src.next_batch()
    assert src.stats.skipped == 1


def damage_record(path, k):
    """Flip one byte inside the data of record k of a TFRecord file (its data CRC then fails)."""
    data = bytearray(open(path, "rb").read())
    pos = 0
    for _ in range(k):
        pos += 8 + 4 + int.from_bytes(data[pos : pos + 8], "little") + 4
    data[pos + 8 + 4 + 3] ^= 0xFF
    open(path, "wb").write(bytes(data))


def test_close_stops_the_prefetching_thread_and_reading_goes_on_where_it_stopped(tmp_path):
    files = write_files(tmp_path)
    make = lambda: RecordWindows(files, EOT, N_CTX, 3, stitch=2, seed=5)  # noqa: E731
    src = make()
    run = [src.next_batch() for _ in range(12)]
    plain = make()
    got = [plain.next_batch() for _ in range(4)]
    plain.close()  # nothing to release: the source reads on as before
    plain.close()
    got += [plain.next_batch() for _ in range(4)]
    np.testing.assert_array_equal(np.stack(got), np.stack(run[:8]))

    pre = Prefetched(make(), 3)
    got = [pre.next_batch() for _ in range(4)]
    thread = pre._thread
    assert thread.is_alive()
    pre.close()
    assert not thread.is_alive() and pre._thread is None
    pre.close()  # closing twice is harmless
    assert pre.state() == pre.source.state()  # the batches read ahead are given back
    got += [pre.next_batch() for _ in range(8)]  # a new thread reads on from the last batch handed out
    pre.close()
    np.testing.assert_array_equal(np.stack(got), np.stack(run))


def test_skipped_records_count_damaged_records(tmp_path, gpt2_tokenizer):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = write_files(tmp_path / "a", n_files=1, docs_per=30, lengths=(40,))  # 30 windows: no epoch ends below
    b = write_files(tmp_path / "b", n_files=1, docs_per=30, lengths=(40,))
    damage_record(a[0], 7)
    damage_record(b[0], 0)
    clean = RecordWindows(write_files(tmp_path, n_files=1), EOT, N_CTX, 4, stitch=1, skip_corrupt=True)
    clean.next_batch()
    assert clean.skipped_records == 0

    single = RecordWindows(a, EOT, N_CTX, 4, stitch=1, shuffle=False, skip_corrupt=True)
    rows = np.concatenate([single.next_batch() for _ in range(7)])  # 28 of the 29 intact documents
    assert single.skipped_records == 1 and single.stats.skipped == 1
    assert (0, 7) not in {d for w in rows for d in window_docs(w) if d is not None}

    make = lambda: MixedWindows([RecordWindows(a, EOT, N_CTX, 4, stitch=1, skip_corrupt=True),  # noqa: E731
                                 RecordWindows(b, EOT, N_CTX, 4, stitch=1, skip_corrupt=True)], [0.5, 0.5], 4, seed=2)
    mix = make()
    for _ in range(4):
        mix.next_batch()
    assert [s.skipped_records for s in mix._sources] == [1, 1] and mix.skipped_records == 2

    pre = Prefetched(make(), 2)
    for _ in range(4):
        pre.next_batch()
    pre.close()
    assert pre.skipped_records == pre.source.skipped_records == 2

    cfg = tiny_config(tmp_path, n_ctx=N_CTX, input="tfrecords", data_path=[a[0], b[0]], data_weights=[0.5, 0.5],
                      stitch=1, skip_corrupt_records=True)
    src = get_input("tfrecords")(cfg, "train", gpt2_tokenizer)
    for _ in range(4):
        src.next_batch()
    assert isinstance(src, MixedWindows) and src.skipped_records == 2


def test_each_source_of_a_mixture_is_named_by_its_own_config_key(tmp_path, gpt2_tokenizer):
    (tmp_path / "a").mkdir()
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("not records")
    (tmp_path / "long").mkdir()
    write_files(tmp_path / "a")
    records.write_documents(str(tmp_path / "long" / "l_0.tfrecords"), [(np.arange(200) % 50000, "l")])
    text, long = str(tmp_path / "text"), str(tmp_path / "long")
    cfg = tiny_config(tmp_path, n_ctx=N_CTX, input="tfrecords", data_path=[str(tmp_path / "a"), text],
                      data_weights=[0.5, 0.5], long_data_path=long)
    with pytest.raises(UserError, match=rf"^data_path\[1\] '{text}' holds no .tfrecords files"):
        get_input("tfrecords")(cfg, "train", gpt2_tokenizer)
    biased = cfg.replace(data_path=str(tmp_path / "a"), data_weights=None)
    with pytest.raises(UserError, match=rf"^long_data_path '{long}' has 1 files but there are 2 hosts"):
        get_input("openwebtext_longbiased")(biased, "train", gpt2_tokenizer, process_index=0, process_count=2)
    with pytest.raises(UserError, match=rf"^long_eval_data_path '{text}' holds no .tfrecords files"):
        get_input("openwebtext_long")(biased.replace(long_eval_data_path=text), "eval", gpt2_tokenizer)
