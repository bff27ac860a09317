"""The user's view: main.py and `python -m gpt2train` as subprocesses, on real small data."""

import json
import os
import re
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


@pytest.fixture(scope="module")
def reference(trained, tmp_path_factory):
    """The per-step losses of the same config trained without interruption."""
    tmp = tmp_path_factory.mktemp("ref")
    cfg = trained[2]
    straight = tiny_config(tmp, **{k: v for k, v in cfg.to_dict().items() if k not in ("model_path", "predict_path")})
    # Through the package's `train` subcommand this time: the same code path as main.py.
    ref = run("-m", "gpt2train", "train", "--model", str(write_config(tmp / "ref.json", straight)))
    assert ref.returncode == 0, ref.stderr
    return step_losses(tmp / "model")


def assert_same_curve(got, want):
    assert sorted(want) == list(range(1, 41)) and sorted(got) == list(range(1, 41))
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=1e-6), step


def test_sigterm_saves_and_rerun_resumes_exactly(trained, reference):
    tmp, path, cfg, (code, err), resumed = trained
    assert code == 2 and "rerun the same command to resume" in err and "Traceback" not in err
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    assert_same_curve(step_losses(tmp / "model"), reference)


ORBAX_TMP = "*.orbax-checkpoint-tmp*"  # Orbax writes a step here and renames it when the save is complete


def test_sigkill_during_checkpointing_loses_only_unsaved_steps(trained, reference, tmp_path):
    """A hard kill while a checkpoint is being written (its temporary directory exists before
    the kill and is still there after it): the rerun resumes from the last complete checkpoint
    and reproduces the uninterrupted run's losses from there on."""
    cfg = tiny_config(tmp_path, **{**{k: v for k, v in trained[2].to_dict().items()
                                      if k not in ("model_path", "predict_path")}, "checkpoint_every": 1})
    path = write_config(tmp_path / "c.json", cfg)
    checkpoints = tmp_path / "model" / "checkpoints"
    killed_mid_save = None
    # A save takes tens of milliseconds: polling every millisecond finds one under way, but it
    # may complete between the look and the kill; then the killed run is resumed and tried again.
    for attempt in range(5):
        proc = subprocess.Popen([sys.executable, "main.py", "--model", str(path)], cwd=REPO, env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            complete = [int(d.name) for d in checkpoints.glob("*") if d.name.isdigit()] if checkpoints.exists() else []
            if len(complete) >= 2 and list(checkpoints.glob(ORBAX_TMP)):
                proc.kill()
                break
            time.sleep(0.001)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, f"the run ended by itself (status {proc.returncode}) before a kill"
        left = list(checkpoints.glob(ORBAX_TMP))
        if left:
            complete = [int(d.name) for d in checkpoints.glob("*") if d.name.isdigit()]
            killed_mid_save = (int(left[0].name.split(".")[0]), max(complete))
            break
    assert killed_mid_save, "no kill landed inside a save in 5 tries"
    unfinished, last_complete = killed_mid_save
    assert unfinished > last_complete
    again = run("main.py", "--model", str(path))
    assert again.returncode == 0, again.stderr
    assert re.search(rf"resumed from \S+ at step {last_complete}\b", again.stdout)  # not the half-written one
    assert not list(checkpoints.glob(ORBAX_TMP))    # and its remains were cleaned up
    assert_same_curve(step_losses(tmp_path / "model"), reference)


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


def test_serve_subcommand_answers_http_until_interrupted(trained):
    """`serve` binds its port, loads the model, answers POST /generate, and stops on Ctrl-C; a
    taken port is a one-line error before the model is loaded."""
    import re
    import urllib.request
    tmp, path, cfg, _, _ = trained
    proc = subprocess.Popen([sys.executable, "-m", "gpt2train", "serve", "--model", str(path), "--port", "0",
                             "--length", "5"], cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        line = proc.stdout.readline()
        port = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        assert port, (line, proc.stderr.read() if proc.poll() is not None else "")
        assert "curl -s http://127.0.0.1:" in proc.stdout.readline()  # an example request to copy
        url = f"http://127.0.0.1:{port.group(1)}/generate"
        body = json.dumps({"prompts": ["import os", "def f():"], "seed": 2}).encode()
        with urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=120) as r:
            reply = json.loads(r.read())
        assert reply["step"] == 40 and len(reply["completions"]) == 2
        taken = run("-m", "gpt2train", "serve", "--model", str(path), "--port", port.group(1), timeout=120)
        assert taken.returncode == 2 and "cannot listen" in taken.stderr and "Traceback" not in taken.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert "POST /generate" in err  # the request log


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


def test_interactive_prompt_in_a_terminal(trained):
    """A real pseudo-terminal: prompt, streamed sample, prompt again, Ctrl-D ends."""
    import pty
    import select
    tmp, path, cfg, _, _ = trained
    pid, fd = pty.fork()
    if pid == 0:  # child: become the generator
        os.chdir(REPO)
        os.execve(sys.executable, [sys.executable, "-m", "gpt2train", "generate", "--model", str(path),
                                   "--length", "8", "--seed", "1"], ENV)
    seen = b""

    def read_until(marker: bytes, count: int, timeout: float = 120) -> None:
        nonlocal seen
        end = time.time() + timeout
        while seen.count(marker) < count and time.time() < end:
            ready, _, _ = select.select([fd], [], [], 0.5)
            if ready:
                try:
                    seen += os.read(fd, 4096)
                except OSError:
                    break
        assert seen.count(marker) >= count, seen.decode(errors="replace")

    read_until(b"Model prompt >>> ", 1)
    os.write(fd, b"def main():\n")
    read_until(b"Model prompt >>> ", 2)
    os.write(fd, b"\x04")  # Ctrl-D
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    text = seen.decode(errors="replace")
    assert " SAMPLE 0 " in text and "=" * 80 in text
    assert os.WEXITSTATUS(status) == 0
    assert "SAMPLE 0" in (tmp / "predictions.txt").read_text()


def test_tokenizer_subcommand(tmp_path):
    from gpt2train.tokenizer import load_tokenizer
    from conftest import STDLIB
    r = run("-m", "gpt2train", "tokenizer", "--input", str(STDLIB / "json" / "*.py"), "--vocab_size", "400",
            "--out", str(tmp_path / "enc"))
    assert r.returncode == 0, r.stderr
    tok = load_tokenizer(str(tmp_path / "enc"))
    assert tok.n_vocab == 400 and tok.eot_id == 399
    text = (STDLIB / "json" / "decoder.py").read_text()
    assert tok.decode(tok.encode(text)) == text
    bad = run("-m", "gpt2train", "tokenizer", "--input", str(tmp_path / "none*.txt"), "--vocab_size", "400",
              "--out", str(tmp_path / "enc2"))
    assert bad.returncode == 2 and "matches no files" in bad.stderr
