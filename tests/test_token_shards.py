"""Token shards: nanoGPT's raw .bin and llm.c's headed shards (v1 uint16, v2 uint32), read by the
"bin" input, written by `encode --format bin`, trained on through main.py, resumed exactly."""

import json
import struct

import numpy as np
import pytest

from conftest import ENCODER_DIR, STDLIB, tiny_config
from gpt2train import shards
from gpt2train.encode import encode_corpus
from gpt2train.errors import UserError
from gpt2train.inputs.bin import ShardWindows
from gpt2train.inputs.prefetch import Prefetched
from gpt2train.text_sources import clean_text

N_VOCAB = 50257


def llmc_bytes(ids, version) -> bytes:
    """A shard as llm.c writes it, built here from its description, not from gpt2train.shards:
    256 little-endian int32 (magic, version, token count, zeros), then uint16 (v1) / uint32 (v2) ids."""
    magic = {1: 20240520, 2: 20240801}[version]
    head = struct.pack("<256i", magic, version, len(ids), *([0] * 253))
    return head + struct.pack(f"<{len(ids)}{'H' if version == 1 else 'I'}", *ids)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory, gpt2_tokenizer):
    """Real text tokenized three ways: a nanoGPT train.bin, an llm.c v1 and an llm.c v2 shard; val.bin."""
    root = tmp_path_factory.mktemp("shards")
    eot = gpt2_tokenizer.eot_id
    def stream(files):
        return [i for f in files for i in [eot, *gpt2_tokenizer.encode(f.read_text())]]
    json_files = sorted((STDLIB / "json").glob("*.py"))
    (root / "train").mkdir()
    np.array(stream(json_files[:2]), dtype=np.uint16).tofile(root / "train" / "a_nanogpt.bin")
    (root / "train" / "b_llmc_v1.bin").write_bytes(llmc_bytes(stream(json_files[2:4]), 1))
    (root / "train" / "c_llmc_v2.bin").write_bytes(llmc_bytes(stream(json_files[4:]), 2))
    np.array(stream(sorted((STDLIB / "email" / "mime").glob("*.py"))), dtype=np.uint16).tofile(root / "val.bin")
    return root


def all_ids(directory):
    """Each file's ids, decoded here from the raw bytes."""
    out = {}
    for path in sorted(directory.glob("*.bin")):
        raw = path.read_bytes()
        magic = struct.unpack_from("<i", raw)[0]
        if magic in (20240520, 20240801):
            out[path.name] = np.frombuffer(raw[1024:], dtype="<u2" if magic == 20240520 else "<u4")
        else:
            out[path.name] = np.frombuffer(raw, dtype="<u2")
    return out


def test_headers_are_detected(shard_dir):
    infos = {p.name: shards.inspect(str(p)) for p in sorted((shard_dir / "train").glob("*.bin"))}
    assert [i.layout for i in infos.values()] == ["nanoGPT", "llm.c v1", "llm.c v2"]
    ids = all_ids(shard_dir / "train")
    assert all(infos[name].tokens == len(ids[name]) for name in ids)


def test_sequential_windows_walk_the_files_in_order(shard_dir):
    ids = all_ids(shard_dir / "train")
    n_ctx, batch = 16, 4
    expected = [tokens[s : s + n_ctx + 1] for tokens in ids.values() for s in range(0, len(tokens) - n_ctx, n_ctx)]
    src = ShardWindows([str(p) for p in (shard_dir / "train").glob("*.bin")], n_ctx, batch, N_VOCAB, order="sequential")
    assert src.num_windows == len(expected)
    got = [row for _ in range(len(expected) // batch + 2) for row in src.next_batch()]
    # ...and wrap around to the first window after the last
    np.testing.assert_array_equal(got, (expected * 2)[: len(got)])


def test_random_windows_follow_the_seeded_draw_and_split_rows_across_hosts(shard_dir):
    ids = all_ids(shard_dir / "train")
    n_ctx, batch = 16, 8
    starts = [(name, s) for name, tokens in ids.items() for s in range(len(tokens) - n_ctx)]
    files = [str(p) for p in (shard_dir / "train").glob("*.bin")]
    hosts = [ShardWindows(files, n_ctx, batch, N_VOCAB, seed=3, process_index=p, process_count=2) for p in range(2)]
    for b in range(3):
        drawn = np.random.default_rng([3, b]).integers(0, len(starts), batch)
        expected = np.stack([ids[starts[i][0]][starts[i][1] : starts[i][1] + n_ctx + 1] for i in drawn])
        np.testing.assert_array_equal(hosts[0].next_batch(), expected[0::2])
        np.testing.assert_array_equal(hosts[1].next_batch(), expected[1::2])


def test_resume_sees_the_batches_of_an_uninterrupted_run(shard_dir):
    files = [str(p) for p in (shard_dir / "train").glob("*.bin")]
    for order in ("random", "sequential"):
        whole = ShardWindows(files, 16, 4, N_VOCAB, order=order, seed=1)
        expected = [whole.next_batch() for _ in range(7)]
        first = Prefetched(ShardWindows(files, 16, 4, N_VOCAB, order=order, seed=1), depth=3)
        got = [first.next_batch() for _ in range(3)]
        saved = json.loads(json.dumps(first.state()))  # as a checkpoint stores it
        first.close()
        again = Prefetched(ShardWindows(files, 16, 4, N_VOCAB, order=order, seed=1), depth=3)
        again.restore(saved)
        got += [again.next_batch() for _ in range(4)]
        again.close()
        np.testing.assert_array_equal(np.stack(got), np.stack(expected))


def test_damaged_headers_and_foreign_ids_are_errors_naming_the_file(tmp_path):
    good = llmc_bytes(list(range(100)), 1)
    cases = {
        "version.bin": good[:4] + struct.pack("<i", 2) + good[8:],  # v1's magic with version 2
        "count.bin": good[:8] + struct.pack("<i", 101) + good[12:],  # one token more than the file holds
        "short.bin": good[:1024 + 198],  # truncated
        "header.bin": good[:100],
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(UserError, match=name):
            shards.inspect(str(tmp_path / name))
    (tmp_path / "odd.bin").write_bytes(b"\x01\x02\x03")
    with pytest.raises(UserError, match="odd.bin.*neither an llm.c shard"):
        shards.inspect(str(tmp_path / "odd.bin"))
    # a header with an unknown magic reads as nanoGPT ids, and its first "ids" are out of range
    (tmp_path / "magic.bin").write_bytes(struct.pack("<i", 20240000) + good[4:])
    src = ShardWindows([str(tmp_path / "magic.bin")], 8, 2, N_VOCAB, order="sequential")
    with pytest.raises(UserError, match="magic.bin.*token id .* n_vocab is 50257.*not an llm.c magic"):
        src.next_batch()
    # ids that do not fit the configured vocabulary
    (tmp_path / "ok.bin").write_bytes(good)
    with pytest.raises(UserError, match="ok.bin.*token id 16 but n_vocab is 10"):
        ShardWindows([str(tmp_path / "ok.bin")], 8, 2, 10, order="sequential").next_batch()


def test_encode_format_bin_writes_llmc_shards(tmp_path, gpt2_tokenizer):
    src = tmp_path / "src"
    src.mkdir()
    texts = [f"Document {i}: " + "the quick brown fox jumps over the lazy dog. " * (i + 2) for i in range(7)]
    (src / "docs.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    summary = encode_corpus(str(src), str(tmp_path / "out"), "fw", str(ENCODER_DIR), files_per=3, minimum_size=1,
                            workers=0, progress=False, log=lambda *_: None, fmt="bin", text_field="body")
    paths = sorted((tmp_path / "out").glob("*.bin"))
    assert [p.name for p in paths] == ["fw_0.bin", "fw_1.bin", "fw_2.bin"] and summary.documents == 7
    eot = gpt2_tokenizer.eot_id
    for path, chunk in zip(paths, [texts[0:3], texts[3:6], texts[6:]]):
        expected = [i for t in chunk for i in [eot, *gpt2_tokenizer.encode(clean_text(t))]]
        assert path.read_bytes() == llmc_bytes(expected, 1)  # llm.c's header and ids, byte for byte
    # a vocabulary past uint16 gets version 2 (uint32 ids)
    ids = np.array([0, 65535, 65536, 69999])
    shards.write_shard(str(tmp_path / "big.bin"), ids, n_vocab=70000)
    assert (tmp_path / "big.bin").read_bytes() == llmc_bytes(ids.tolist(), 2)
    with pytest.raises(ValueError, match="70000"):
        shards.write_shard(str(tmp_path / "bad.bin"), np.array([70000]), n_vocab=70000)


def bin_config(tmp_path, shard_dir, **kw):
    return tiny_config(tmp_path, input="bin", data_path=str(shard_dir / "train"),
                       eval_data_path=str(shard_dir / "val.bin"), prefetch=2, **kw)


def test_main_py_trains_on_nanogpt_and_llmc_shards_and_resumes(tmp_path, shard_dir):
    """main.py on all three layouts at once, stopped at step 2 and resumed to 4; that the resumed
    batches are exactly the uninterrupted ones is test_resume_sees_the_batches_of_an_uninterrupted_run."""
    from gpt2train.checkpoint import Checkpointer
    from test_cli import run, step_losses, write_config
    cfg = bin_config(tmp_path, shard_dir, max_steps=2, train_steps=2)
    path = write_config(tmp_path / "bin.json", cfg)
    first = run("main.py", "--model", str(path))
    assert first.returncode == 0, first.stderr
    resumed = run("main.py", "--model", str(path), "--max_steps", "4")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout + resumed.stderr and "at step 2" in resumed.stdout + resumed.stderr
    losses = step_losses(tmp_path / "model")
    assert 4 in losses and losses[4] < losses[min(losses)]
    ckpt = Checkpointer(cfg.replace(max_steps=4), create=False)
    assert ckpt.read_meta(2)["data"] == {"batches": 2} and ckpt.read_meta(4)["data"] == {"batches": 4}
    ckpt.close()


def test_the_fineweb_recipe_config_loads():
    from conftest import REPO
    from gpt2train.config import load_config
    cfg = load_config(str(REPO / "configs" / "124M-fineweb.json"))
    assert cfg.input == "bin" and cfg.train_batch_size * cfg.n_ctx == 524288 and cfg.max_steps == 19073
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_vocab) == (12, 768, 12, 50257)
