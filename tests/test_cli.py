"""The user's view: main.py and `python -m gpt2train` as subprocesses, on real small data."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, tiny_config, write_config

ENV = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}


def run(*args, timeout=300, **kw):
    return subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=timeout, **kw)


def step_losses(model_dir):
    lines = [json.loads(x) for x in (model_dir / "metrics.jsonl").read_text().splitlines()]
    return {x["step"]: x["loss"] for x in lines if "loss" in x}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained through main.py, killed with SIGTERM part-way and resumed."""
    tmp = tmp_path_factory.mktemp("cli")
    cfg = tiny_config(tmp, max_steps=40, iterations=1, train_steps=20, checkpoint_every=5, res_dropout=0.1)
    path = write_config(tmp / "tiny.json", cfg)
    proc = subprocess.Popen([sys.executable, "main.py", "--model", str(path)], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp / "model" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and (not metrics.exists() or len(step_losses(tmp / "model")) < 8):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    interrupted = (proc.returncode, err)
    resumed = run("main.py", "--model", str(path))
    return tmp, path, cfg, interrupted, resumed


def test_sigterm_saves_and_rerun_resumes_exactly(trained, tmp_path):
    tmp, path, cfg, (code, err), resumed = trained
    assert code == 2 and "rerun the same command to resume" in err and "Traceback" not in err
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    # An uninterrupted run of the same config gives the same loss at every step.
    straight = tiny_config(tmp_path, **{k: v for k, v in cfg.to_dict().items()
                                        if k not in ("model_path", "predict_path")})
    ref = run("main.py", "--model", str(write_config(tmp_path / "ref.json", straight)))
    assert ref.returncode == 0, ref.stderr
    got, want = step_losses(tmp / "model"), step_losses(tmp_path / "model")
    assert sorted(want) == list(range(1, 41)) and sorted(got) == list(range(1, 41))
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=1e-6), step


def test_predict_text_writes_seed_banner_format(trained):
    tmp, path, cfg, _, _ = trained
    r = run("main.py", "--model", str(path), "--predict_text", "import os", "--length", "12",
            "--top_k", "40", "--seed", "3", "--samples", "2")
    assert r.returncode == 0, r.stderr
    banner0 = "=" * 40 + " SAMPLE 0 " + "=" * 40
    banner1 = "=" * 40 + " SAMPLE 1 " + "=" * 40
    assert banner0 in r.stdout and banner1 in r.stdout
    written = (tmp / "predictions.txt").read_text()
    assert written.startswith(banner0 + "\n") and written.rstrip("\n").endswith("=" * 80)
    assert written.count("=" * 80 + "\n") == 2
    again = run("main.py", "--model", str(path), "--predict_text", "import os", "--length", "12",
                "--top_k", "40", "--seed", "3", "--samples", "2")
    assert again.stdout == r.stdout  # same seed, same text


def test_generate_subcommand_with_prompt_file_and_piped_stdin(trained):
    tmp, path, cfg, _, _ = trained
    prompts = tmp / "prompts.txt"
    prompts.write_text("def main():\nclass A:\n")
    r = run("-m", "gpt2train", "generate", "--model", str(path), "--prompts", str(prompts), "--length", "5",
            "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count(" SAMPLE ") == 2
    piped = run("-m", "gpt2train", "generate", "--model", str(path), "--length", "5", input="import sys\n")
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout.count(" SAMPLE ") == 1


def test_evaluate_subcommand(trained):
    tmp, path, cfg, _, _ = trained
    r = run("-m", "gpt2train", "evaluate", "--model", str(path), "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["step"] == 40 and result["perplexity"] > 1 and 0 < result["bits_per_byte"] < 20


@pytest.mark.parametrize("args, words", [
    (["--predict_text", "a", "--predict_file", "b"], ["only one of", "--predict_text", "--predict_file"]),
    (["--n_layr", "3"], ["unknown config key 'n_layr'", "'n_layer'"]),
    (["--n_head", "5"], ["n_embd (64) must be divisible by n_head (5)"]),
    (["--predict_file", "/nonexistent/prompt.txt"], ["prompt file not found"]),
    (["--tpu", "my-tpu"], ["no TPU"]),
    (["--model_path", "/nonexistent/model", "--predict_text", "hi"], ["no checkpoint found"]),
    (["--encoder_path", "/nonexistent/enc"], ["download_model.py"]),
    (["--data_path", "/nonexistent/data/*.txt"], ["/nonexistent/data"]),
])
def test_user_mistakes_give_one_clear_error(trained, args, words):
    tmp, path, cfg, _, _ = trained
    r = run("main.py", "--model", str(path), *args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    for w in words:
        assert w in r.stderr, r.stderr


def test_keys_and_help():
    r = run("-m", "gpt2train", "keys")
    assert r.returncode == 0 and "scale_by_depth" in r.stdout and "eval_data_path" in r.stdout
    h = run("main.py", "--help")
    assert h.returncode == 0 and "--predict_text" in h.stdout and "--top_k" in h.stdout
