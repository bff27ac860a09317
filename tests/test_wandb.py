"""Weights & Biases, offline: a real run's W&B files are read back (its .wandb record log, the media
it wrote): the config, the same scalars as metrics.jsonl, the samples and the curves image; a
restart continues the same W&B run; without the package, one clear line."""

import glob
import json
import os
import struct
import sys

import pytest

pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2  # noqa: E402

from conftest import tiny_config, write_config  # noqa: E402
from gpt2train.cli import guarded, run_main  # noqa: E402
from gpt2train.errors import UserError  # noqa: E402
from gpt2train.train import Trainer  # noqa: E402

BLOCK = 32768  # the .wandb file is LevelDB's log format: 32 KiB blocks of checksummed chunks


def records(path):
    """The protobuf Records of a .wandb file, in order."""
    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a chunk header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += BLOCK - pos % BLOCK
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # 1 full, 2 first, 3 middle, 4 last
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def read_run(run_dir):
    """(run record, config, history rows) of one offline run directory."""
    [log] = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    run, config, history = None, {}, []
    for r in records(log):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run = r.run
            config.update({i.key: json.loads(i.value_json) for i in r.run.config.update})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in r.config.update})
        elif kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
    return run, config, history


@pytest.fixture(scope="module")
def logged(tmp_path_factory, gpt2_tokenizer):
    tmp = tmp_path_factory.mktemp("wandb")
    saved = {k: os.environ.get(k) for k in ("WANDB_MODE", "WANDB_SILENT")}
    os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true")
    cfg = tiny_config(tmp, max_steps=4, train_steps=2, iterations=2, wandb_project="gpt2train-test",
                      wandb_run_name="tiny", sample_every=4, sample_options={"length": 4})
    try:
        Trainer(cfg, gpt2_tokenizer, progress=False, log=lambda *a, **k: None).run()
        first = sorted(glob.glob(cfg.model_path + "/wandb/offline-run-*"))
        resumed = cfg.replace(max_steps=6)
        Trainer(resumed, gpt2_tokenizer, progress=False, log=lambda *a, **k: None).run()
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    runs = sorted(glob.glob(cfg.model_path + "/wandb/offline-run-*"))
    return cfg, first, runs


def test_run_files_hold_the_config_scalars_samples_and_curves(logged):
    cfg, [first], _ = logged
    run, config, history = read_run(first)
    assert run.project == "gpt2train-test" and run.display_name == "tiny"
    assert config["lr"] == cfg.lr and config["n_layer"] == 2 and config["wandb_project"] == "gpt2train-test"
    metrics = [json.loads(line) for line in open(cfg.model_path + "/metrics.jsonl")]
    logged_loss = {(h["step"], h["loss"]) for h in history if "loss" in h}
    assert {(m["step"], m["loss"]) for m in metrics if "loss" in m and m["step"] <= 4} == logged_loss
    assert [h["eval_loss"] for h in history if "eval_loss" in h] == [m["eval_loss"] for m in metrics
                                                                     if "eval_loss" in m and m["step"] <= 4]
    tables = [h for h in history if "samples/_type" in h]
    images = [h for h in history if "curves/_type" in h]
    assert [h["step"] for h in tables] == [4] and [h["step"] for h in images] == [2, 4]
    table = json.load(open(os.path.join(first, "files", tables[0]["samples/path"])))
    sample = json.loads(open(cfg.model_path + "/samples.jsonl").readline())
    assert table["columns"] == ["step", "prompt", "text"] and table["data"] == [[4, sample["prompt"], sample["text"]]]
    assert open(os.path.join(first, "files", images[-1]["curves/path"]), "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_a_restart_continues_the_same_wandb_run(logged):
    cfg, _, runs = logged
    assert len(runs) == 2
    (first, _, _), (second, _, history) = read_run(runs[0]), read_run(runs[1])
    kept = open(cfg.model_path + "/wandb_run_id").read().strip()
    assert first.run_id == second.run_id == kept
    assert min(h["step"] for h in history if "loss" in h) > 4  # it logs on from the checkpoint


def test_without_the_package_one_clear_line(tmp_path, gpt2_tokenizer, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` meets when it is not installed
    cfg = tiny_config(tmp_path, wandb_project="p")
    with pytest.raises(UserError, match=r'pip install -e "\.\[wandb\]"'):
        Trainer(cfg, gpt2_tokenizer, progress=False)
    config = write_config(tmp_path / "cfg.json", cfg)
    assert guarded(run_main, ["train", "--model", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "wandb" in err and "Traceback" not in err
