"""The README's fine-tuning recipe, command by command, against a stand-in for the Hugging Face
Hub on 127.0.0.1 serving a small random GPT-2 as "124M"."""

import json
import os
import subprocess
import sys
import threading
from http.server import ThreadingHTTPServer

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import ENCODER_DIR, REPO, STDLIB  # noqa: E402
from hub_server import Hub  # noqa: E402
from gpt2train.cli import run_main  # noqa: E402

REPO_ID = "openai-community/gpt2"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hub")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64))
    hf.save_pretrained(tmp / "model")
    Hub.files = {(REPO_ID, name): (tmp / "model" / name).read_bytes() for name in ("config.json", "model.safetensors")}
    # No vocab.json / merges.txt here: GPT-2's vocabulary ships with the package, nothing downloads it.
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", tmp
    server.shutdown()


def run(*args, endpoint, home, cwd):
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "HF_ENDPOINT": endpoint,
           "HF_HOME": str(home), "HF_HUB_DISABLE_TELEMETRY": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_download_encode_finetune_sample_evaluate_export(hub, tmp_path):
    endpoint, _ = hub
    # 1. download: the last line printed is the ready config
    got = run(str(REPO / "download_model.py"), "124M", "--out", "models", endpoint=endpoint, home=tmp_path / "hf",
              cwd=tmp_path)
    assert got.returncode == 0, got.stderr
    config = got.stdout.strip().splitlines()[-1]
    assert config == str(tmp_path / "models" / "124M" / "config.json")
    assert json.loads(open(config).read())["n_embd"] == 32
    assert (tmp_path / "models" / "encoder" / "encoder.json").read_bytes() == (ENCODER_DIR / "encoder.json").read_bytes()
    #    ... and samples from the pretrained model at once
    sample = run("-m", "gpt2train", "generate", "--model", config, "--predict_text", "Hello", "--length", "4",
                 endpoint=endpoint, home=tmp_path / "hf", cwd=tmp_path)
    assert sample.returncode == 0 and "SAMPLE 0" in sample.stdout, sample.stderr

    # 2. encode your text
    (tmp_path / "my_text").mkdir()
    for name in ("decoder.py", "encoder.py", "scanner.py"):
        (tmp_path / "my_text" / f"{name}.txt").write_text((STDLIB / "json" / name).read_text())
    (tmp_path / "held_out.txt").write_text((STDLIB / "json" / "tool.py").read_text())
    assert run_main(["encode", "--input", str(tmp_path / "my_text"), "--out", str(tmp_path / "data"), "--name", "mine",
                     "--encoder_path", str(tmp_path / "models" / "encoder"), "--workers", "0"]) == 0

    # 3. fine-tune from the pretrained model (fresh optimizer, step 0, shorter context)
    run_dir = tmp_path / "runs" / "mine"
    common = ["--model_path", str(run_dir), "--n_ctx", "32"]
    before = evaluate(config, tmp_path / "held_out.txt", ["--stride", "16"])
    train = run(str(REPO / "main.py"), "--model", config, *common,
                "--init_from", str(tmp_path / "models" / "124M"), "--input", "tfrecords",
                "--data_path", str(tmp_path / "data"), "--stitch", "1", "--max_steps", "30", "--train_steps", "30",
                "--eval_steps", "0", "--warmup_steps", "5", "--lr", "3e-3", "--train_batch_size", "8",
                "--embed_dropout", "0", "--attn_dropout", "0", "--res_dropout", "0",
                endpoint=endpoint, home=tmp_path / "hf", cwd=tmp_path)
    assert train.returncode == 0, train.stderr
    assert "initialised from the pretrained model" in train.stdout + train.stderr
    first = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1

    # 4. sample from the fine-tuned model
    sample = run(str(REPO / "main.py"), "--model", config, *common, "--predict_text", "def decode(", "--length", "8",
                 endpoint=endpoint, home=tmp_path / "hf", cwd=tmp_path)
    assert sample.returncode == 0 and "SAMPLE 0" in sample.stdout, sample.stderr

    # 5. evaluate with a stride: perplexity on held-out Python fell
    after = evaluate(config, tmp_path / "held_out.txt", common + ["--stride", "16"])
    assert after["perplexity"] < 0.5 * before["perplexity"]

    # 6. export to HF format and load it with transformers
    assert run_main(["export", "--model", config, *common, "--out", str(tmp_path / "export")]) == 0
    model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "export")
    tok = transformers.GPT2TokenizerFast.from_pretrained(tmp_path / "export")
    assert model.config.n_positions == 32 and tok.encode("Hello world") == [15496, 995]


def evaluate(config, data, extra):
    from gpt2train.cli import cmd_evaluate, load

    class Args:
        model = config
    stride = None
    if "--stride" in extra:
        i = extra.index("--stride")
        stride, extra = int(extra[i + 1]), extra[:i] + extra[i + 2:]
    from gpt2train.cli import parse_overrides
    return cmd_evaluate(load(Args, parse_overrides(extra)), str(data), stride)


def test_download_errors(hub, tmp_path):
    endpoint, _ = hub
    unknown = run(str(REPO / "download_model.py"), "125M", endpoint=endpoint, home=tmp_path / "hf", cwd=tmp_path)
    assert unknown.returncode != 0 and "neither a model name" in unknown.stderr and "124M" in unknown.stderr
    Hub.bad_etag = {"model.safetensors"}
    try:
        bad = run(str(REPO / "download_model.py"), "124M", endpoint=endpoint, home=tmp_path / "hf2", cwd=tmp_path)
    finally:
        Hub.bad_etag = set()
    assert bad.returncode != 0 and "failed its checksum" in bad.stderr
    offline = run(str(REPO / "download_model.py"), "355M", endpoint="http://127.0.0.1:9", home=tmp_path / "hf3",
                  cwd=tmp_path)
    assert offline.returncode != 0 and "offline" in offline.stderr and "Traceback" not in offline.stderr
