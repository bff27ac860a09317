"""The Hub round trip against the local stand-in hub (tests/hub_server.py): a trained run is pushed
with `export --push_to_hub`, transformers' from_pretrained reads it back and computes our logits,
the model card tells what was trained, and init_from takes the repository id back into training."""

import json
import os
import subprocess
import sys
import threading
from http.server import ThreadingHTTPServer

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import REPO, tiny_config, write_config  # noqa: E402
from hub_server import Hub  # noqa: E402
from gpt2train import model  # noqa: E402
from gpt2train.checkpoint import load_params  # noqa: E402
from gpt2train.cli import guarded, run_main  # noqa: E402
from gpt2train.errors import UserError  # noqa: E402
from gpt2train.pretrained import fit, load_pretrained  # noqa: E402
from gpt2train.train import Trainer  # noqa: E402

REPO_ID = "someone/tiny-gpt2"
TOKENS = [[464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13]]

READ_BACK = """
import json, sys, torch, transformers
model = transformers.GPT2LMHeadModel.from_pretrained(sys.argv[1]).eval()
tok = transformers.AutoTokenizer.from_pretrained(sys.argv[1])
with torch.no_grad():
    logits = model(torch.tensor(json.loads(sys.argv[2]))).logits
print(json.dumps({"logits": logits.tolist(), "hello": tok.encode("Hello world")}))
"""


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    Hub.files, Hub.tokens, Hub.commits = {}, [], []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def pushed(hub, tmp_path_factory, gpt2_tokenizer):
    tmp = tmp_path_factory.mktemp("push")
    cfg = tiny_config(tmp, max_steps=4, train_steps=2, iterations=2)
    Trainer(cfg, gpt2_tokenizer, progress=False, log=lambda *a, **k: None).run()
    config = write_config(tmp / "cfg.json", cfg)
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_ENDPOINT", hub)
    mp.setenv("HF_TOKEN", "hf_test_token")
    try:
        assert run_main(["export", "--model", str(config), "--push_to_hub", REPO_ID, "--out", str(tmp / "hf")]) == 0
    finally:
        mp.undo()
    return cfg, config, tmp


def test_push_is_read_back_by_from_pretrained(pushed, hub, tmp_path):
    cfg, _, _ = pushed
    assert {path for repo, path in Hub.files if repo == REPO_ID} >= {
        "config.json", "model.safetensors", "README.md", "curves.png", "vocab.json", "merges.txt"}
    assert set(Hub.tokens) == {"Bearer hf_test_token"}
    env = {**os.environ, "HF_ENDPOINT": hub, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    got = subprocess.run([sys.executable, "-c", READ_BACK, REPO_ID, json.dumps(TOKENS)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert got.returncode == 0, got.stderr
    theirs = json.loads(got.stdout.strip().splitlines()[-1])
    params, _ = load_params(cfg)
    ours = np.asarray(model.forward(params, np.array(TOKENS, np.int32), cfg))[..., :cfg.n_vocab]
    np.testing.assert_allclose(np.array(theirs["logits"]), ours, atol=2e-4, rtol=1e-4)
    assert theirs["hello"] == [15496, 995]


def test_model_card_tells_what_was_trained(pushed):
    cfg, _, _ = pushed
    card = Hub.files[(REPO_ID, "README.md")].decode()
    last_eval = [json.loads(line) for line in open(cfg.model_path + "/metrics.jsonl") if "eval_loss" in line][-1]
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert f"# {REPO_ID}" in card and "for 4 steps (512 tokens)" in card
    assert f"loss **{last_eval['eval_loss']:.4f}**" in card and "![training curves](curves.png)" in card
    assert f"| `data_path` | `{json.dumps(cfg.data_path)}` |" in card
    assert Hub.files[(REPO_ID, "curves.png")][:8] == b"\x89PNG\r\n\x1a\n"


def test_init_from_a_hub_repository_id(pushed, hub, tmp_path, monkeypatch):
    import huggingface_hub.constants
    cfg, _, _ = pushed
    monkeypatch.setenv("HF_ENDPOINT", hub)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    pre = load_pretrained(REPO_ID)
    params, _ = load_params(cfg)
    fitted = fit(pre, cfg)
    np.testing.assert_array_equal(fitted["wte"], np.asarray(params["wte"]))
    np.testing.assert_array_equal(fitted["h"]["mlp"]["c_fc"]["kernel"], np.asarray(params["h"]["mlp"]["c_fc"]["kernel"]))
    with pytest.raises(UserError, match="not a local directory, nor a model on"):
        load_pretrained("someone/no-such-model")


def test_push_errors_are_one_line(pushed, hub, monkeypatch, capsys):
    _, config, _ = pushed
    monkeypatch.setenv("HF_ENDPOINT", hub)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(REPO / "no-such-hf-home"))  # no token saved by `hf auth login` either
    assert guarded(run_main, ["export", "--model", str(config), "--push_to_hub", "a/b"]) == 2
    assert "needs a Hugging Face token" in capsys.readouterr().err
    assert guarded(run_main, ["export", "--model", str(config)]) == 2
    assert "--push_to_hub" in capsys.readouterr().err
