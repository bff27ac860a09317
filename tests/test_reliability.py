"""No silent corruption and no traceback for a user's or the machine's fault: damaged
checkpoints, out-of-range token ids, another vocabulary, other data on resume, unwritable
paths, a full disk, crafted shard names, a shared compile cache."""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import ENCODER_DIR, REPO, tiny_config, write_config
from gpt2train import records
from gpt2train.checkpoint import Checkpointer, load_params
from gpt2train.errors import UserError
from gpt2train.tokenizer import load_tokenizer
from gpt2train.train import Trainer

QUIET = dict(progress=False, log=lambda *a, **k: None)
ENV = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def array_files(model: Path, step: int) -> list[Path]:
    """The files holding a step's arrays, largest first."""
    found = [p for p in (model / "checkpoints" / str(step) / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    return sorted(found, key=lambda p: -p.stat().st_size)


def same_trees(a, b) -> bool:
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def run4(tmp_path_factory):
    """A tiny run with checkpoints at steps 2 and 4; tests damage copies of it."""
    tmp = tmp_path_factory.mktemp("run4")
    cfg = tiny_config(tmp, max_steps=4, checkpoint_every=2, train_steps=2, eval_steps=0)
    tok = load_tokenizer(cfg.encoder_path)
    Trainer(cfg, tok, **QUIET).run()
    params, _ = load_params(cfg)
    return tmp, cfg, tok, jax.device_get(params)


def copy_run(run4, dest: Path, **changes):
    tmp, cfg, tok, params = run4
    shutil.copytree(tmp / "model", dest / "model")
    return cfg.replace(model_path=str(dest / "model"), **changes), tok, params


def test_a_damaged_checkpoint_is_refused_and_the_fallback_resumes_bitwise(run4, tmp_path):
    cfg, tok, params4 = copy_run(run4, tmp_path)
    # Where the parameters lie depends on the order Orbax's writers finished: flip one byte at a
    # time (the middle of each file, largest first, then its quarters and eighths) until the damage
    # lands in a parameter (flipping back undoes it). A flip is refused, or else it hit bytes a
    # restore never reads (a few small files: what loads is then exactly what was saved); none
    # loads changed values.
    saved = _full_state(cfg, 4)
    msg = ""
    spots = [(f, f.stat().st_size * k // 8) for k in (4, 2, 6, 1, 3, 5, 7) for f in array_files(Path(cfg.model_path), 4)]
    for data_file, offset in spots:
        flip_byte(data_file, offset)
        try:
            loaded = Trainer(cfg, tok, **QUIET).state
        except UserError as e:
            msg = str(e)
            if "is damaged: array params/" in msg:
                break
        else:
            assert same_trees(jax.device_get(loaded), saved), f"{data_file} was damaged and loaded silently"
        flip_byte(data_file, offset)
    assert "is damaged: array params/" in msg, msg
    assert "checkpoint of step 4" in msg and "is damaged: array " in msg and "differs from what was saved" in msg
    assert "newest intact checkpoint is step 2" in msg and "--resume_fallback" in msg
    with pytest.raises(UserError, match="step 4 .* is damaged: array params/"):  # generate and evaluate refuse too
        load_params(cfg)
    logs = []
    trainer = Trainer(cfg.replace(resume_fallback=True), tok, progress=False, log=logs.append)
    assert trainer.step == 2 and any("resuming from step 2" in line for line in logs)
    assert [p.name.split("-")[0] for p in (Path(cfg.model_path) / "damaged_checkpoints").iterdir()] == ["4"]
    trainer.run()
    assert same_trees(load_params(cfg)[0], params4)  # trained again from step 2: bitwise the lost step 4


def _full_state(cfg, step):
    """The whole saved train state (parameters, optimizer state, step, RNG), verified."""
    from gpt2train.optimizers import make_optimizer
    from gpt2train.train import for_saving, init_state
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                            jax.eval_shape(lambda: for_saving(cfg, init_state(cfg, make_optimizer(cfg)))))
    ckpt = Checkpointer(cfg, create=False)
    try:
        return jax.device_get(ckpt.restore(abstract, step)[0])
    finally:
        ckpt.close()


def test_flipped_bytes_anywhere_in_the_arrays_never_load_silently(run4, tmp_path):
    base = tmp_path / "base"
    cfg, _, _ = copy_run(run4, base)
    saved = _full_state(cfg, 4)
    outcomes = {"refused": 0, "identical": 0}
    files = array_files(Path(cfg.model_path), 4)
    positions = [(f, int(f.stat().st_size * frac)) for f in files[:3] for frac in (0.0, 0.25, 0.5, 0.75, 0.999)]
    for i, (f, offset) in enumerate(positions):
        work = tmp_path / str(i)
        shutil.copytree(base / "model", work / "model")
        flip_byte(work / "model" / f.relative_to(base / "model"), offset)
        try:
            loaded = _full_state(cfg.replace(model_path=str(work / "model")), 4)
        except UserError as e:
            assert "step 4" in str(e)
            outcomes["refused"] += 1
            continue
        assert same_trees(loaded, saved), f"byte {offset} of {f.name} changed the state silently"
        outcomes["identical"] += 1  # a byte no array is read from (padding, an unused header field)
    # Which of the 15 bytes no array is read from depends on where the compressed chunks fall, which
    # moves with the trained values (an AMD EPYC refused 12, an Intel Xeon 11): most must be refused.
    assert outcomes["refused"] >= 10 and sum(outcomes.values()) == len(positions) == 15, outcomes


def test_a_nan_names_its_step_and_the_verified_start(run4, tmp_path):
    cfg, tok, _ = copy_run(run4, tmp_path, max_steps=20, lr=1e30, warmup_steps=0)
    with pytest.raises(UserError) as e:
        Trainer(cfg, tok, **QUIET).run()
    msg = str(e.value)
    assert "It resumed from step 4 (whose arrays matched their checksums)" in msg
    assert "every token id fed to the model lay within [0, n_vocab)" in msg and "last good checkpoint is step 4" in msg


def _records(path: Path, docs) -> str:
    records.write_documents(str(path), [(np.asarray(d), f"doc{i}") for i, d in enumerate(docs)])
    return str(path)


def test_token_ids_outside_the_vocabulary_stop_with_file_record_and_offset(tmp_path, gpt2_tokenizer):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 50257, 200) for _ in range(6)]
    docs[1][7] = 50300  # >= n_vocab: a NaN at some later step, before these checks
    docs[4][0] = -3  # negative: trained silently, before
    data = _records(tmp_path / "bad_0.tfrecords", docs)
    cfg = tiny_config(tmp_path, input="tfrecords", data_path=data, eval_data_path=None, eval_steps=0,
                      max_steps=2, stitch=1, prefetch=0)
    with pytest.raises(UserError) as e:
        Trainer(cfg, gpt2_tokenizer, **QUIET).run()
    offset = 0
    for d in docs[:1]:
        offset += 16 + len(records.encode_example(d, "doc0"))
    assert f"bad_0.tfrecords: record 1 (byte offset {offset}) holds token id 50300, outside the vocabulary's [0, 50257)" \
        in str(e.value)
    result = Trainer(cfg.replace(skip_corrupt_records=True), gpt2_tokenizer, **QUIET).run()
    # Counted each time the file is read (once per pass over it): both records, every pass.
    assert result.step == 2 and result.skipped_records >= 2 and result.skipped_records % 2 == 0


def _swapped_encoder(dest: Path) -> str:
    """GPT-2's vocabulary with the ids of "!" and '"' swapped: same size, another fingerprint."""
    dest.mkdir()
    encoder = json.loads((ENCODER_DIR / "encoder.json").read_text())
    encoder["!"], encoder['"'] = encoder['"'], encoder["!"]
    (dest / "encoder.json").write_text(json.dumps(encoder))
    shutil.copy(ENCODER_DIR / "vocab.bpe", dest / "vocab.bpe")
    return str(dest)


def test_another_vocabulary_is_refused_at_resume_generate_evaluate_and_on_records(run4, tmp_path):
    cfg, tok, _ = copy_run(run4, tmp_path)
    other_dir = _swapped_encoder(tmp_path / "other_enc")
    other = load_tokenizer(other_dir)
    assert other.n_vocab == tok.n_vocab and other.fingerprint != tok.fingerprint
    moved = cfg.replace(encoder_path=other_dir)
    for attempt in (lambda: Trainer(moved, other, **QUIET), lambda: load_params(moved, tokenizer=other)):
        with pytest.raises(UserError) as e:
            attempt()
        assert tok.fingerprint in str(e.value) and other.fingerprint in str(e.value) and other_dir in str(e.value)
    from gpt2train.cli import cmd_evaluate
    with pytest.raises(UserError, match="trained with the vocabulary"):
        cmd_evaluate(moved, str(ENCODER_DIR.parent.parent / "config.py"))
    # Records encoded with GPT-2's vocabulary, trained on with the other one.
    from gpt2train.encode import encode_corpus
    (tmp_path / "text.txt").write_text("Some words to encode, and a few more words after them. " * 40)
    encode_corpus(str(tmp_path / "text.txt"), str(tmp_path / "enc"), "t", str(ENCODER_DIR), minimum_size=1,
                  workers=0, progress=False, log=lambda *a: None)
    assert json.loads((tmp_path / "enc" / "t.encode.json").read_text())["encoder_fingerprint"] == tok.fingerprint
    fresh = tiny_config(tmp_path / "fresh", input="tfrecords", data_path=str(tmp_path / "enc"), eval_data_path=None,
                        eval_steps=0, encoder_path=other_dir)
    with pytest.raises(UserError, match=r"t_0.tfrecords was encoded with the vocabulary 50257-"):
        Trainer(fresh, other, **QUIET)


def test_resuming_on_other_data_needs_allow_data_change(run4, tmp_path):
    cfg, tok, _ = copy_run(run4, tmp_path, max_steps=6)
    other = cfg.replace(data_path=str(Path(cfg.data_path).parent.parent / "email" / "*.py"))
    with pytest.raises(UserError, match=r"other data settings \(data_path: .*--allow_data_change"):
        Trainer(other, tok, **QUIET)
    logs = []
    trainer = Trainer(other.replace(allow_data_change=True), tok, progress=False, log=logs.append)
    assert trainer.step == 4 and any("starts from its beginning" in line for line in logs)
    assert trainer.run().step == 6


def test_broken_encoder_files_are_one_clear_error(tmp_path):
    for name, text, words in [("bad_json", '{"a": 1,', "is not valid JSON"),
                              ("gap", json.dumps({"a": 0, "b": 2, "<|endoftext|>": 3}), "id 1 is missing"),
                              ("twice", json.dumps({"a": 0, "b": 0, "<|endoftext|>": 1}), "id 0 is repeated"),
                              ("list", "[1, 2]", "must be a JSON object")]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "encoder.json").write_text(text)
        shutil.copy(ENCODER_DIR / "vocab.bpe", tmp_path / name / "vocab.bpe")
        with pytest.raises(UserError, match=words):
            load_tokenizer(str(tmp_path / name))


def run_cli(*args, preexec_fn=None, timeout=300):
    return subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=timeout, preexec_fn=preexec_fn)


def assert_one_line_error(r, *words):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, r.stderr[-3000:]
    for w in words:
        assert w in errors[0], errors[0]


def test_filesystem_failures_are_one_line_and_exit_2(run4, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cfg, _, _ = copy_run(run4, tmp_path)
    # model_path under a file, and on a read-only file system (/proc: not even root writes there).
    for model_path, words in [(a_file / "model", ["model_path", "is not writable"]),
                              ("/proc/gpt2train-model", ["model_path /proc/gpt2train-model is not writable"])]:
        path = write_config(tmp_path / "c.json", cfg.replace(model_path=str(model_path)))
        assert_one_line_error(run_cli("main.py", "--model", str(path)), *words)
    # predict_path unwritable: refused before any sample is printed.
    path = write_config(tmp_path / "c.json", cfg.replace(predict_path=str(a_file / "p.txt")))
    r = run_cli("main.py", "--model", str(path), "--predict_text", "hi", "--length", "2")
    assert_one_line_error(r, "cannot write samples to predict_path")
    assert "SAMPLE" not in r.stdout
    # encode --out under a file.
    r = run_cli("-m", "gpt2train", "encode", "--input", str(ENCODER_DIR / "vocab.bpe"), "--out", str(a_file / "o"),
                "--name", "x", "--encoder_path", str(ENCODER_DIR), "--workers", "0")
    assert_one_line_error(r, "cannot write to --out")


def _limit_file_size():
    """In the child: files may not grow past 1 MB (a checkpoint's array file is ~24 MB), and
    the write fails with EFBIG instead of killing the process: a disk that fills up mid-save."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))


def test_a_disk_that_fills_during_a_save_is_one_line_and_loses_nothing(run4, tmp_path):
    cfg, _, _ = copy_run(run4, tmp_path, max_steps=6)
    path = write_config(tmp_path / "c.json", cfg)
    r = run_cli("main.py", "--model", str(path), preexec_fn=_limit_file_size)
    assert_one_line_error(r, "saving the checkpoint of step 6", "failed (File too large",
                          "the newest complete checkpoint is step 4")
    assert len(r.stderr.splitlines()) < 20, r.stderr  # not a thousand lines of asyncio tracebacks
    assert Checkpointer(cfg).all_steps() == [2, 4]
    again = run_cli("main.py", "--model", str(path))  # room again: resumes from step 4
    assert again.returncode == 0 and "resumed from" in again.stdout, again.stderr[-2000:]


def test_a_crafted_shard_index_cannot_read_other_files(tmp_path):
    from gpt2train.pretrained import load_hf
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10, "n_positions": 8,
                                                      "n_embd": 4, "n_layer": 1, "n_head": 1}))
    for name in ("../secret.safetensors", "/etc/passwd", "sub/dir.safetensors"):
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"wte.weight": name}}))
        with pytest.raises(UserError, match="not a plain file name"):
            load_hf(str(tmp_path))


def test_a_compile_cache_others_can_write_to_is_refused(tmp_path):
    from gpt2train import compile_cache
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(UserError, match="other users can write to it.*chmod go-w"):
        compile_cache.check_private(str(shared))
    shared.chmod(0o700)
    compile_cache.check_private(str(shared))


def test_a_sigterm_on_one_host_stops_every_host_at_one_step_with_a_checkpoint(tmp_path):
    """A preemption notice reaches one worker of a pod: both agree on the stop step (JAX's
    preemption sync point), save together and exit; before, the other host hung in the save."""
    import time
    from test_scale import free_port
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(Path(__file__).parent / "preemption_worker.py"),
                               str(Path(__file__).parent), str(port), str(pid), str(tmp_path)],
                              env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for pid in (0, 1)]
    metrics = tmp_path / "model" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 4):
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.1)
    procs[1].send_signal(signal.SIGTERM)  # the notice reaches host 1 only
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.split("RESULT ", 1)[1]))
    assert [r["how"] for r in results] == ["interrupted", "interrupted"]
    assert results[0]["step"] == results[1]["step"]
    step = results[0]["step"]
    assert Checkpointer(tiny_config(tmp_path)).all_steps() == [step]


def test_checkpoint_every_seconds_saves_when_its_time_has_passed(tmp_path, gpt2_tokenizer):
    from gpt2train.hooks import CheckpointEverySeconds
    now = [0.0]

    def clock():  # a clock the test moves: 2 s per reading
        now[0] += 2.0
        return now[0]

    cfg = tiny_config(tmp_path, max_steps=9, checkpoint_every=100, train_steps=100, eval_steps=0, keep_checkpoints=10)
    trainer = Trainer(cfg, gpt2_tokenizer, **QUIET)
    trainer.hooks = [h for h in trainer.hooks if not isinstance(h, CheckpointEverySeconds)]
    trainer.add_hook(CheckpointEverySeconds(10.0, 1, clock=clock))
    trainer.run()
    # Read at the start (2 s) and once per step: 12 - 2 >= 10 at step 5, which saves and reads it
    # again (14); step 9 is the run's end, saved by the Checkpoint hook.
    assert Checkpointer(cfg).all_steps() == [5, 9]


def _steps_logged(model: Path) -> int:
    metrics = model / "metrics.jsonl"
    return len([x for x in metrics.read_text().splitlines() if '"loss"' in x]) if metrics.exists() else 0


def test_sigkills_at_any_moment_and_during_a_save_end_bitwise_equal(tmp_path, gpt2_tokenizer):
    """The bounded kill loop: three SIGKILLs (the second while Orbax's temporary step directory
    exists, i.e. during a save), then a run to the end; the final parameters equal, bit for bit,
    those of a run never interrupted."""
    import time
    common = dict(max_steps=10, checkpoint_every=1, train_steps=10, eval_steps=0, iterations=1, res_dropout=0.1,
                  keep_checkpoints=2)
    reference = Trainer(tiny_config(tmp_path / "ref", **common), gpt2_tokenizer, **QUIET)
    reference.run()
    cfg = tiny_config(tmp_path / "killed", **common)
    path = write_config(tmp_path / "killed.json", cfg)
    model, checkpoints = tmp_path / "killed" / "model", tmp_path / "killed" / "model" / "checkpoints"

    def start():
        return subprocess.Popen([sys.executable, "main.py", "--model", str(path)], cwd=REPO, env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def wait_for(condition, proc):
        deadline = time.time() + 300
        while not condition():
            assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
            time.sleep(0.002)

    kills = []
    for moment in ("after 3 steps", "during a save", "after 2 more steps"):
        proc = start()
        logged = _steps_logged(model)
        if moment == "during a save":
            wait_for(lambda: logged < _steps_logged(model) and any("tmp" in p.name for p in checkpoints.iterdir()), proc)
        else:
            wait_for(lambda: _steps_logged(model) >= logged + (3 if kills == [] else 2), proc)
        proc.kill()
        proc.wait()
        if moment == "during a save":
            assert any("tmp" in p.name for p in checkpoints.iterdir())  # the half-written step is still there
        kills.append(moment)
    final = start()
    assert final.wait(timeout=300) == 0
    assert len(kills) == 3
    params, step = load_params(cfg)
    assert step == 10 and same_trees(params, jax.device_get(reference.state["params"]))


def test_json_types_are_strict_and_floats_finite(tmp_path):
    from gpt2train.config import load_config
    cases = [({"n_layer": True}, "'n_layer' must be an int (a whole number), got True (true/false)"),
             ({"n_layer": "2"}, "'n_layer' must be an int (a whole number), got '2' (a quoted string): write 2 without quotes"),
             ({"lr": "inf"}, "'lr' must be a number, got 'inf'"),
             ({"remat": 1}, "'remat' must be true or false"),
             ({"model_path": 5}, "'model_path' must be a string")]
    for values, words in cases:
        (tmp_path / "c.json").write_text(json.dumps(values))
        with pytest.raises(UserError) as e:
            load_config(str(tmp_path / "c.json"))
        assert words in str(e.value)
    (tmp_path / "c.json").write_text(json.dumps({"n_layer": 2, "lr": 1e-3}))
    with pytest.raises(UserError, match="lr must be a finite number, got inf"):
        load_config(str(tmp_path / "c.json"), {"lr": "inf"})  # the command line's strings are converted...
    assert load_config(str(tmp_path / "c.json"), {"n_layer": "3", "remat": "true"}).n_layer == 3  # ...and checked


def test_a_record_error_counts_records_in_its_own_file(tmp_path):
    good = [np.arange(5) + i for i in range(4)]
    _records(tmp_path / "a_0.tfrecords", good)
    frames = [records._frame(records.encode_example(d, "x")) for d in good[:2]]
    second = tmp_path / "a_1.tfrecords"
    second.write_bytes(b"".join(frames) + records._frame(b"\x0a\x03abc"))  # record 2 is not an Example
    stats = records.ReadStats()
    list(records.read_documents(str(tmp_path / "a_0.tfrecords"), stats=stats))
    with pytest.raises(UserError) as e:
        list(records.read_documents(str(second), stats=stats))  # the shared stats once said "record 6"
    assert f"a_1.tfrecords: record 2 (byte offset {sum(map(len, frames))}) is not a tf.train.Example" in str(e.value)


def test_a_smaller_vocabulary_is_refused_before_generating(run4, tmp_path):
    from gpt2train.cli import check_vocabulary
    from gpt2train.tokenizer import Tokenizer
    encoder = json.loads((ENCODER_DIR / "encoder.json").read_text())
    small = {t: i for t, i in encoder.items() if i < 256} | {"<|endoftext|>": 256}
    with pytest.raises(UserError, match="n_vocab is 50257 in the config but the tokenizer .* has 257 tokens"):
        check_vocabulary(run4[1], Tokenizer(small))  # generating with it was an IndexError traceback
