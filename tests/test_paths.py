"""Every path may be remote: config, encoder, data, predictions and metrics through fsspec
(memory:// here, as gs:// would be), checkpoints through file:// URLs."""

import json

import fsspec
import pytest

from conftest import ENCODER_DIR, STDLIB, tiny_config
from gpt2train import records
from gpt2train.cli import run_main
from gpt2train.errors import UserError
from gpt2train.metrics import MetricsWriter
from gpt2train.paths import checkpoint_dir, expand_paths


def put(url, data):
    with fsspec.open(url, "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def test_train_and_generate_with_remote_config_encoder_data_and_predictions(tmp_path):
    for name in ("encoder.json", "vocab.bpe"):
        put(f"memory://paths/encoder/{name}", (ENCODER_DIR / name).read_bytes())
    for src in sorted((STDLIB / "json").glob("*.py")):
        put(f"memory://paths/data/{src.name}", src.read_text())
    put("memory://paths/held/a.py", (STDLIB / "email" / "charset.py").read_text())
    cfg = tiny_config(tmp_path, encoder_path="memory://paths/encoder", data_path="memory://paths/data",
                      eval_data_path="memory://paths/held/*.py", model_path=f"file://{tmp_path}/run",
                      predict_path="memory://paths/out/predictions.txt", max_steps=2, train_steps=2, eval_steps=1)
    put("memory://paths/config.json", json.dumps(cfg.to_dict()))
    assert run_main(["train", "--model", "memory://paths/config.json"]) == 0
    assert (tmp_path / "run" / "checkpoints" / "2").is_dir()  # file:// became a local directory
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert any("eval_loss" in json.loads(x) for x in lines)
    assert run_main(["generate", "--model", "memory://paths/config.json", "--predict_text", "import",
                     "--length", "3", "--seed", "0"]) == 0
    with fsspec.open("memory://paths/out/predictions.txt", "r") as f:
        assert "SAMPLE 0" in f.read()


def test_records_metrics_and_globs_on_a_remote_filesystem():
    for i in range(3):
        records.write_documents(f"memory://rec/c_{i}.tfrecords", [([i, i + 1], f"d{i}")])
    found = expand_paths("memory://rec/*.tfrecords")
    assert [p.rsplit("/", 1)[1] for p in found] == [f"c_{i}.tfrecords" for i in range(3)]
    assert all(p.startswith("memory://") for p in found) and expand_paths("memory://rec") == found
    assert [t.tolist() for p in found for t, _ in records.read_documents(p)] == [[0, 1], [1, 2], [2, 3]]
    writer = MetricsWriter("memory://metrics-run")
    writer.write({"step": 1, "loss": 2.5})
    writer.write({"step": 2, "loss": 2.0})
    writer.close()
    with fsspec.open("memory://metrics-run/metrics.jsonl", "r") as f:
        assert [json.loads(x)["loss"] for x in f] == [2.5, 2.0]


def test_checkpoint_locations(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert checkpoint_dir("runs/a") == f"{tmp_path}/runs/a/checkpoints"
    assert checkpoint_dir("file:///data/run/") == "/data/run/checkpoints"
    assert checkpoint_dir("gs://bucket/run") == "gs://bucket/run/checkpoints"
    with pytest.raises(UserError, match="memory://x.*local directory or gs://"):
        checkpoint_dir("memory://x")
    with pytest.raises(UserError, match="Orbax 0.12 cannot write checkpoints to s3://"):
        checkpoint_dir("s3://bucket/run")
