"""Parquet text: the one reader (encode, tokenizer training, the text input) and the streamed
"parquet" input (row groups read ahead by threads, hosts reading their own files, exact resume)."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import ENCODER_DIR, STDLIB, tiny_config
from gpt2train import records
from gpt2train.encode import encode_corpus
from gpt2train.errors import UserError
from gpt2train.inputs.parquet import ParquetWindows
from gpt2train.inputs.prefetch import Prefetched
from gpt2train.text_sources import clean_text, iter_documents, token_documents

ROWS_PER_GROUP = 3


def texts_of(pattern):
    return [p.read_text() for p in sorted(STDLIB.glob(pattern))]


def write_parquet(path, texts, column="content"):
    """Texts in `column` beside an id column, ROWS_PER_GROUP rows per row group."""
    table = pa.table({"id": list(range(len(texts))), column: texts})
    pq.write_table(table, path, row_group_size=ROWS_PER_GROUP)


@pytest.fixture(scope="module")
def parquet_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("parquet")
    (root / "train").mkdir()
    write_parquet(root / "train" / "part-0.parquet", texts_of("json/*.py"))
    write_parquet(root / "train" / "part-1.parquet", texts_of("email/mime/*.py"))
    write_parquet(root / "train" / "part-2.parquet", texts_of("email/_*.py"))
    write_parquet(root / "val.parquet", texts_of("http/*.py"))
    return root


def row_group_windows(path, tokenizer, n_ctx, column="content"):
    """Each row group's windows, rebuilt here from the layout the input documents."""
    out = []
    parquet = pq.ParquetFile(path)
    for g in range(parquet.num_row_groups):
        texts = parquet.read_row_group(g, columns=[column]).column(0).to_pylist()
        stream = [i for t in texts for i in [*tokenizer.encode(t), tokenizer.eot_id]]
        out.append([stream[s : s + n_ctx + 1] for s in range(0, len(stream) - n_ctx, n_ctx)])
    return out


def test_every_reader_reads_parquet_rows_as_documents(parquet_dir, tmp_path, gpt2_tokenizer):
    path = str(parquet_dir / "train" / "part-0.parquet")
    docs = list(iter_documents([path], "content"))
    assert [name for name, _ in docs][:4] == [f"{path}:0:0", f"{path}:0:1", f"{path}:0:2", f"{path}:1:0"]
    assert [text for _, text in docs] == texts_of("json/*.py")
    assert [d.tolist() for d in token_documents([path], gpt2_tokenizer, text_field="content")] == \
        [gpt2_tokenizer.encode(t) for t in texts_of("json/*.py")]
    # encode reads the same rows
    encode_corpus([path], str(tmp_path / "rec"), "pq", str(ENCODER_DIR), files_per=100, minimum_size=1, workers=0,
                  progress=False, log=lambda *_: None, text_field="content")
    written = list(records.read_documents(str(tmp_path / "rec" / "pq_0.tfrecords")))
    assert [t.tolist() for t, _ in written] == [gpt2_tokenizer.encode(clean_text(t)) for t in texts_of("json/*.py")]
    assert written[3][1].decode() == f"{path}:1:0"


def test_missing_or_non_text_column_is_one_clear_error(parquet_dir, tmp_path):
    path = str(parquet_dir / "val.parquet")
    with pytest.raises(UserError, match=r"val.parquet has no column 'text' \(its columns: id, content\).*text_field"):
        list(iter_documents([path]))
    with pytest.raises(UserError, match="column 'id' holds int64, not text"):
        list(iter_documents([path], "id"))
    (tmp_path / "x.parquet").write_text("not parquet")
    with pytest.raises(UserError, match="x.parquet is not a Parquet file"):
        list(iter_documents([str(tmp_path / "x.parquet")]))


def test_sequential_windows_stream_row_groups_in_order(parquet_dir, gpt2_tokenizer):
    files = sorted(str(p) for p in (parquet_dir / "train").glob("*.parquet"))
    n_ctx = 32
    expected = [w for f in files for group in row_group_windows(f, gpt2_tokenizer, n_ctx) for w in group]
    src = ParquetWindows(files, gpt2_tokenizer, n_ctx, 4, text_field="content", order="sequential", readers=3)
    got = [row for _ in range(len(expected) // 4 + 3) for row in src.next_batch()]
    src.close()
    np.testing.assert_array_equal(got, (expected * 2)[: len(got)])  # and round again after the last


def test_hosts_read_their_own_files_and_shuffle_within_row_groups(parquet_dir, gpt2_tokenizer):
    files = sorted(str(p) for p in (parquet_dir / "train").glob("*.parquet"))
    n_ctx, seed = 32, 5
    for host, own in [(0, [0, 2]), (1, [1])]:
        src = ParquetWindows(files, gpt2_tokenizer, n_ctx, 4, text_field="content", order="random", seed=seed,
                             process_index=host, process_count=2)
        order = np.random.default_rng([seed, 0]).permutation(len(own))
        expected = []
        for slot in order:
            index = own[slot]
            for g, windows in enumerate(row_group_windows(files[index], gpt2_tokenizer, n_ctx)):
                perm = np.random.default_rng([seed, 0, index, g]).permutation(len(windows))
                expected += [windows[i] for i in perm]
        got = [row for _ in range(len(expected) // 2) for row in src.next_batch()]
        src.close()
        np.testing.assert_array_equal(got, expected[: len(got)])


def test_resume_sees_the_batches_of_an_uninterrupted_run(parquet_dir, gpt2_tokenizer):
    files = sorted(str(p) for p in (parquet_dir / "train").glob("*.parquet"))
    def source():
        return ParquetWindows(files, gpt2_tokenizer, 32, 4, text_field="content", seed=2, readers=3)
    whole = source()
    expected = [whole.next_batch() for _ in range(40)]  # past the end of an epoch
    whole.close()
    for stop in (3, 17):
        first = Prefetched(source(), depth=2)
        got = [first.next_batch() for _ in range(stop)]
        saved = json.loads(json.dumps(first.state()))
        first.close()
        assert set(saved) == {"epoch", "file", "row_group", "window"}
        again = Prefetched(source(), depth=2)
        again.restore(saved)
        got += [again.next_batch() for _ in range(40 - stop)]
        again.close()
        np.testing.assert_array_equal(np.stack(got), np.stack(expected))


def parquet_config(tmp_path, parquet_dir, **kw):
    return tiny_config(tmp_path, input="parquet", text_field="content", data_path=str(parquet_dir / "train"),
                       eval_data_path=str(parquet_dir / "val.parquet"), prefetch=2, readers=2, **kw)


def test_main_py_trains_on_parquet_and_resumes(tmp_path, parquet_dir):
    from gpt2train.checkpoint import Checkpointer
    from test_cli import run, step_losses, write_config
    cfg = parquet_config(tmp_path, parquet_dir, max_steps=2, train_steps=2)
    path = write_config(tmp_path / "pq.json", cfg)
    first = run("main.py", "--model", str(path))
    assert first.returncode == 0, first.stderr
    resumed = run("main.py", "--model", str(path), "--max_steps", "4")
    assert resumed.returncode == 0, resumed.stderr
    assert "at step 2" in resumed.stdout + resumed.stderr
    losses = step_losses(tmp_path / "model")
    assert 4 in losses and losses[4] < losses[min(losses)]
    ckpt = Checkpointer(cfg.replace(max_steps=4), create=False)
    # 4 steps x 4 rows = 16 windows: file 0 in the seed-0 order, its row groups read in turn
    assert ckpt.read_meta(4)["data"]["epoch"] == 0 and ckpt.read_meta(2)["data"] != ckpt.read_meta(4)["data"]
    ckpt.close()
    wrong = run("main.py", "--model", str(path), "--text_field", "body", "--max_steps", "6")
    assert wrong.returncode == 2 and "has no column 'body'" in wrong.stderr and "Traceback" not in wrong.stderr


@pytest.fixture(scope="module")
def hub_dataset(parquet_dir):
    """The training Parquet files as the dataset org/web on the stand-in hub."""
    from hub_server import Hub, start
    Hub.datasets = {("org/web", f"data/{p.name}"): p.read_bytes() for p in (parquet_dir / "train").glob("*.parquet")}
    Hub.datasets[("org/web", "README.md")] = b"# web\n"
    server, endpoint = start()
    yield Hub, endpoint
    server.shutdown()


def test_hf_datasets_are_read_through_the_hub_and_survive_a_dropped_connection(hub_dataset, tmp_path, parquet_dir,
                                                                             gpt2_tokenizer):
    import os
    import subprocess
    import sys
    from conftest import REPO
    from test_cli import step_losses, write_config
    hub, endpoint = hub_dataset
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "HF_ENDPOINT": endpoint,
           "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    def run(*args):
        return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    # encode reads the hub's Parquet rows as it reads local ones
    hub.drop_once, hub.dropped = {"data/part-1.parquet"}, []
    encoded = run("-m", "gpt2train", "encode", "--input", "hf://datasets/org/web/data", "--text_field", "content",
                  "--out", str(tmp_path / "shards"), "--name", "web", "--encoder_path", str(ENCODER_DIR),
                  "--format", "bin", "--workers", "0", "--minimum_size", "1")
    assert encoded.returncode == 0, encoded.stderr
    assert hub.dropped == ["data/part-1.parquet"]  # cut once, read again
    ids = np.fromfile(tmp_path / "shards" / "web_0.bin", dtype="<u2")[512:]  # after llm.c's 1024-byte header
    docs = [gpt2_tokenizer.encode(clean_text(t)) for t in sorted_texts(parquet_dir)]
    assert ids.tolist() == [i for d in docs if d for i in [gpt2_tokenizer.eot_id, *d]]  # empty files are dropped
    # training streams it
    cfg = parquet_config(tmp_path, parquet_dir, max_steps=2, train_steps=2, eval_steps=0)
    path = write_config(tmp_path / "hf.json", cfg.replace(data_path="hf://datasets/org/web/data/*.parquet"))
    trained = run("main.py", "--model", str(path))
    assert trained.returncode == 0, trained.stderr
    assert 2 in step_losses(tmp_path / "model")
    missing = run("main.py", "--model", str(path), "--data_path", "hf://datasets/org/other/*.parquet", "--max_steps", "3")
    assert missing.returncode == 2 and "matches no files" in missing.stderr and "Traceback" not in missing.stderr


def sorted_texts(parquet_dir):
    return [t for p in sorted((parquet_dir / "train").glob("*.parquet"))
            for t in pq.read_table(p, columns=["content"]).column(0).to_pylist()]


def test_remote_reads_are_retried_and_give_up_in_one_line():
    from gpt2train.paths import with_retries
    calls = []
    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("connection reset by peer")
        return "rows"
    assert with_retries(flaky, "part-0.parquet", first_wait=0.001) == "rows" and len(calls) == 3
    def gone():
        calls.append(1)
        raise FileNotFoundError("part-9.parquet")
    calls.clear()
    with pytest.raises(FileNotFoundError):  # not retried: it will not appear
        with_retries(gone, "part-9.parquet", first_wait=0.001)
    assert len(calls) == 1
    with pytest.raises(UserError, match="reading part-0.parquet failed 3 times, the last with TimeoutError"):
        with_retries(lambda: (_ for _ in ()).throw(TimeoutError("timed out")), "part-0.parquet", attempts=3,
                     first_wait=0.001)
