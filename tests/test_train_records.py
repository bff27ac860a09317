"""Training from encoded .tfrecords: exact resume (prefetch on), and main.py end to end."""

import numpy as np
import pytest

from conftest import ENCODER_DIR, STDLIB, tiny_config
from gpt2train.encode import encode_corpus
from gpt2train.train import Trainer


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    out = tmp_path_factory.mktemp("records")
    encode_corpus([str(STDLIB / "json" / "*.py"), str(STDLIB / "email" / "*.py")], str(out), "py",
                  str(ENCODER_DIR), files_per=4, minimum_size=16, workers=0, holdout_fraction=0.2,
                  progress=False, log=lambda *_: None)
    return out


def records_config(tmp_path, encoded, **kw):
    kw = {"stitch": 2, "prefetch": 2, **kw}
    return tiny_config(tmp_path, input="tfrecords", data_path=str(encoded), eval_data_path=str(encoded / "eval"), **kw)


def test_resumed_run_on_records_sees_the_same_batches(tmp_path, encoded, gpt2_tokenizer):
    quiet = dict(progress=False, log=lambda *a, **k: None)
    common = dict(max_steps=6, train_steps=3, checkpoint_every=3)
    whole = Trainer(records_config(tmp_path / "a", encoded, **common), gpt2_tokenizer, **quiet).run()
    cfg = records_config(tmp_path / "b", encoded, **common)
    first = Trainer(cfg, gpt2_tokenizer, **quiet).run(until=2)
    rest = Trainer(cfg, gpt2_tokenizer, **quiet).run()
    got = [h["loss"] for h in first.history + rest.history]
    np.testing.assert_allclose(got, [h["loss"] for h in whole.history], rtol=0, atol=1e-6)
    assert whole.eval_loss is not None and rest.eval_loss == pytest.approx(whole.eval_loss, abs=1e-6)
    assert got[-1] < got[0]


def test_main_py_trains_and_samples_from_records(tmp_path, encoded):
    from test_cli import run, write_config
    cfg = records_config(tmp_path, encoded, max_steps=4, train_steps=2)
    path = write_config(tmp_path / "rec.json", cfg)
    trained = run("main.py", "--model", str(path))
    assert trained.returncode == 0, trained.stderr
    assert (tmp_path / "model" / "checkpoints" / "4").is_dir()
    sampled = run("main.py", "--model", str(path), "--predict_text", "import json", "--length", "5", "--seed", "1")
    assert sampled.returncode == 0, sampled.stderr
    assert "SAMPLE 0" in sampled.stdout


def test_damaged_records_skipped_in_training_are_reported(tmp_path, encoded, gpt2_tokenizer):
    import json
    import shutil
    from test_record_inputs import damage_record
    data = tmp_path / "data"
    shutil.copytree(encoded, data)
    for path in data.glob("*.tfrecords"):  # whichever files the first steps read hold a damaged record
        damage_record(str(path), 0)
    cfg = records_config(tmp_path, data, max_steps=4, train_steps=2, iterations=2, skip_corrupt_records=True)
    result = Trainer(cfg, gpt2_tokenizer, progress=False, log=lambda *a, **k: None).run()
    assert result.skipped_records >= 1
    lines = [json.loads(x) for x in (tmp_path / "model" / "metrics.jsonl").read_text().splitlines()]
    assert [x.get("skipped_records") for x in lines if "tokens_per_s" in x][-1] == result.skipped_records
