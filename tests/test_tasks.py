"""The standard tasks (gpt2train/tasks/): the batched scorer against the model's own losses, the
windows of long texts, `evaluate --task` offline against a stand-in hub serving the fixture files,
local copies, download failures, and task scores during training across a stop and resume."""

import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO, tiny_config, write_config
from gpt2train import model
from gpt2train.cli import run_main
from gpt2train.errors import UserError
from gpt2train.tasks import TASKS
from gpt2train.tasks.data import CACHE_ENV, MIRROR_ENV
from gpt2train.tasks.scorer import Request, Scorer, rolling_requests
from gpt2train.train import Trainer, initial_params
from hub_server import Hub, start

FIXTURES = REPO / "tests" / "fixtures" / "tasks"


class TaskHub(Hub):
    files: dict = {}


def fixture_for(f) -> pathlib.Path:
    if f.hub and f.hub[1].endswith(".parquet"):  # WikiText-2 and -103 share their test set
        return FIXTURES / "wikitext-2-raw-v1" / "test-00000-of-00001.parquet"
    return FIXTURES / f.local_names[0]


def serve_fixtures() -> dict:
    """Each task's files where the registry looks for them: the hub's dataset paths, the mirror's URL paths."""
    from urllib.parse import urlsplit
    files = {}
    for task in TASKS.values():
        for f in task.files:
            key = ("datasets/" + f.hub[0], f.hub[1]) if f.hub else ("mirror", urlsplit(f.url).netloc + urlsplit(f.url).path)
            files[key] = fixture_for(f).read_bytes()
    return files


@pytest.fixture(scope="module")
def hub():
    TaskHub.files = serve_fixtures()
    server, endpoint = start(TaskHub)
    yield endpoint
    server.shutdown()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model's step-0 checkpoint, for the commands to load."""
    tmp = tmp_path_factory.mktemp("tasks")
    cfg = tiny_config(tmp, eval_steps=0, n_ctx=64)
    from gpt2train.tokenizer import load_tokenizer
    trainer = Trainer(cfg, load_tokenizer(cfg.encoder_path), progress=False, log=lambda *a: None)
    trainer.save()
    trainer.ckpt.close()
    return cfg, write_config(tmp / "config.json", cfg)


def test_scorer_matches_the_models_own_losses_and_argmax(tmp_path):
    cfg = tiny_config(tmp_path, eval_batch_size=2)
    params = initial_params(cfg)
    width = cfg.n_ctx + 1
    # The model's own logits, each sequence alone (right-padded: causal, so padding changes nothing before it).
    forward = jax.jit(lambda p, t: model.forward(p, t, cfg)[0, :, :cfg.n_vocab])

    def logits_of(tokens):
        padded = np.zeros((1, width), np.int32)
        padded[0, :len(tokens)] = tokens
        return np.asarray(forward(params, padded))[:len(tokens)]

    rng = np.random.default_rng(0)
    requests = [Request(rng.integers(0, cfg.n_vocab, n).astype(np.int32), int(rng.integers(1, n)))
                for n in (3, 10, 33, 20, 7, 33, 2, 15)]
    # Requests sharing a context (packed as one unit: the context once, each continuation after it),
    # one of them twice, and a group too long for one row (split into several units).
    context = rng.integers(0, cfg.n_vocab, 9).astype(np.int32)
    for n_cont in (1, 4, 2):
        requests.append(Request(np.concatenate([context, rng.integers(0, cfg.n_vocab, n_cont)]).astype(np.int32), n_cont))
    requests.append(requests[-2])
    long_context = rng.integers(0, cfg.n_vocab, 20).astype(np.int32)
    for n_cont in (9, 12, 5):
        requests.append(Request(np.concatenate([long_context, rng.integers(0, cfg.n_vocab, n_cont)]).astype(np.int32),
                                n_cont))
    seq = [11, 22]  # one request continues with the model's own top choices, so "all greedy" is true once
    for _ in range(6):
        seq.append(int(np.argmax(logits_of(seq)[-1])))
    requests.append(Request(np.asarray(seq, np.int32), 5))
    scorer = Scorer(cfg)
    batches = scorer.plan(requests)
    assert any(b.packed for b in batches)
    assert sum(len(b.owners) for b in batches) == sum(r.n_scored for r in requests)
    # the shared contexts are computed once: fewer input tokens than the requests have
    assert sum(int((b.arrays[2] > 0).sum()) for b in batches) < sum(len(r.tokens) - 1 for r in requests)
    ll, greedy = scorer.score(params, requests)
    for r, got, top in zip(requests, ll, greedy):
        logits = logits_of(r.tokens[:-1])
        logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
        targets = r.tokens[1:]
        want = float(np.take_along_axis(logp, targets[:, None], 1)[-r.n_scored:].sum())
        assert got == pytest.approx(want, abs=1e-4)
        assert top == bool(np.all(np.argmax(logits, -1)[-r.n_scored:] == targets[-r.n_scored:]))
    assert greedy[-1] and not greedy[:-1].any()


@pytest.mark.parametrize("n,n_ctx,stride", [(1, 4, None), (5, 4, None), (10, 4, None), (10, 4, 1), (37, 8, 3), (8, 8, 8)])
def test_rolling_windows_score_every_target_once_with_full_context(n, n_ctx, stride):
    tokens = np.arange(n + 1)
    seen = []
    for r in rolling_requests(tokens, n_ctx, stride):
        assert 2 <= len(r.tokens) <= n_ctx + 1 and 1 <= r.n_scored <= len(r.tokens) - 1
        for i in range(len(r.tokens) - r.n_scored, len(r.tokens)):
            p = int(r.tokens[i])  # target p sees the i tokens before it in its window
            seen.append(p)
            assert i >= min(p, n_ctx + 1 - r.n_scored)  # all it can, or a window's full width less the new ones
    assert seen == list(range(1, n + 1))


def run_cli(*args, env_extra):
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "HF_HUB_DISABLE_TELEMETRY": "1",
           **env_extra}
    return subprocess.run([sys.executable, "-m", "gpt2train", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


def test_evaluate_tasks_offline_from_the_stand_in_hub(hub, trained, tmp_path):
    cfg, config = trained
    env = {"HF_ENDPOINT": hub, "HF_HOME": str(tmp_path / "hf"), MIRROR_ENV: hub + "/mirror",
           CACHE_ENV: str(tmp_path / "cache")}
    got = run_cli("evaluate", "--model", str(config), "--task", "lambada", "hellaswag", "wikitext2", "enwik8",
                  env_extra=env)
    assert got.returncode == 0, got.stderr
    for name in ("lambada", "hellaswag", "wikitext2", "enwik8"):
        assert name in got.stdout
    assert "word_perplexity" in got.stdout and "acc_norm" in got.stdout and "fixture" in got.stdout
    record = json.loads(open(os.path.join(cfg.model_path, "eval_tasks.json")).read())
    tasks = record["tasks"]
    assert tasks["lambada"]["items"] == 40 and tasks["hellaswag"]["items"] == 40
    assert all(t["data"] == "fixture" for t in tasks.values())
    assert 0 <= tasks["hellaswag"]["acc_norm"] <= 1 and tasks["enwik8"]["bits_per_byte"] > 0
    # The files are cached: the same command with the hub gone still works.
    again = run_cli("evaluate", "--model", str(config), "--task", "hellaswag", "--limit", "4",
                    env_extra={**env, MIRROR_ENV: "http://127.0.0.1:9/mirror"})
    assert again.returncode == 0, again.stderr
    # With nothing cached and nothing reachable: one line naming the file and where to put it.
    offline = run_cli("evaluate", "--model", str(config), "--task", "lambada",
                      env_extra={**env, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf2")})
    assert offline.returncode == 2 and "Traceback" not in offline.stderr
    assert "lambada_test_en.jsonl" in offline.stderr and "--task_data" in offline.stderr
    assert len(offline.stderr.strip().splitlines()) == 1


def test_task_data_directory_and_per_document(trained, tmp_path, capsys):
    cfg, config = trained
    assert run_main(["evaluate", "--model", str(config), "--task", "hellaswag", "wikitext103",
                     "--task_data", str(FIXTURES), "--limit", "5"]) == 0
    out = capsys.readouterr().out
    assert "hellaswag" in out and "wikitext103" in out
    record = json.loads(open(os.path.join(cfg.model_path, "eval_tasks.json")).read())
    assert record["tasks"]["hellaswag"]["items"] == 5 and record["tasks"]["hellaswag"]["data"] == "fixture"
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("A short one.", "Another " * 80)))
    assert run_main(["evaluate", "--model", str(config), "--per_document", "--data", str(docs)]) == 0
    record = json.loads(open(os.path.join(cfg.model_path, "eval_tasks.json")).read())
    assert record["tasks"]["per_document"]["items"] == 2 and record["tasks"]["per_document"]["word_perplexity"] > 1


def test_mistakes_are_one_line_errors(trained, hub, tmp_path, monkeypatch):
    cfg, config = trained
    with pytest.raises(UserError, match="unknown task 'hellaswog'"):
        run_main(["evaluate", "--model", str(config), "--task", "hellaswog"])
    with pytest.raises(UserError, match="needs hellaswag_val.jsonl"):
        run_main(["evaluate", "--model", str(config), "--task", "hellaswag", "--task_data", str(tmp_path)])
    with pytest.raises(UserError, match="--stride 999 must be between 1 and n_ctx"):
        run_main(["evaluate", "--model", str(config), "--task", "enwik8", "--task_data", str(FIXTURES), "--stride", "999"])
    with pytest.raises(UserError, match="one file but 2 tasks"):
        run_main(["evaluate", "--model", str(config), "--task", "hellaswag", "lambada",
                  "--task_data", str(FIXTURES / "hellaswag_val.jsonl")])
    monkeypatch.setenv(MIRROR_ENV, hub + "/nowhere")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    with pytest.raises(UserError, match="HTTP 404"):
        run_main(["evaluate", "--model", str(config), "--task", "enwik8"])


def test_a_local_copy_that_is_not_the_fixture_is_marked_and_its_hash_shown(trained, tmp_path, capsys):
    cfg, config = trained
    mine = tmp_path / "hellaswag_val.jsonl"
    mine.write_text((FIXTURES / "hellaswag_val.jsonl").read_text().splitlines()[3] + "\n")
    assert run_main(["evaluate", "--model", str(config), "--task", "hellaswag", "--task_data", str(tmp_path)]) == 0
    assert "sha256" in capsys.readouterr().out
    record = json.loads(open(os.path.join(cfg.model_path, "eval_tasks.json")).read())
    assert record["tasks"]["hellaswag"]["data"] == "unpinned" and record["tasks"]["hellaswag"]["items"] == 1


def test_training_logs_task_scores_at_every_evaluation_and_after_a_kill(tmp_path):
    from gpt2train.tokenizer import load_tokenizer
    cfg = tiny_config(tmp_path, max_steps=6, train_steps=2, eval_steps=0, eval_tasks=["hellaswag", "lambada"],
                      eval_tasks_items=4, task_data=str(FIXTURES), checkpoint_every=2)
    tok = load_tokenizer(cfg.encoder_path)
    lines = []
    first = Trainer(cfg, tok, progress=False, log=lines.append)
    first.run(until=3)  # stops at 3 with a checkpoint there ...
    assert first.shown_tasks.keys() == {"hellaswag", "lambada"}
    with open(os.path.join(cfg.model_path, "metrics.jsonl"), "a") as f:  # ... and, as a run killed at step 4
        f.write(json.dumps({"step": 4, "task_hellaswag_acc_norm": 9.0, "task_lambada_perplexity": 9.0}) + "\n")
    resumed = Trainer(cfg, tok, progress=False, log=lines.append)
    resumed.run()
    records = [json.loads(line) for line in open(os.path.join(cfg.model_path, "metrics.jsonl"))]
    scored = [r for r in records if "task_hellaswag_acc_norm" in r]
    assert [r["step"] for r in scored] == [2, 3, 4, 6]  # the killed run's step 4 replaced by the resumed run's
    assert all(0 <= r["task_hellaswag_acc_norm"] <= 1 and r["task_lambada_perplexity"] > 1 for r in scored)
    assert any(line.startswith("step 6:") and "hellaswag" in line and "lambada" in line for line in lines)


def test_task_scores_after_a_real_sigkill_equal_an_uninterrupted_run(tmp_path):
    """main.py is killed (SIGKILL) once task scores have been logged and training has gone on; the
    rerun resumes, and its metrics.jsonl holds each evaluation's scores once, equal to those of a
    run never interrupted."""
    import time
    from gpt2train.tokenizer import load_tokenizer
    common = dict(max_steps=6, train_steps=2, eval_steps=0, iterations=1, checkpoint_every=1,
                  eval_tasks=["hellaswag", "lambada"], eval_tasks_items=4, task_data=str(FIXTURES))
    reference = Trainer(tiny_config(tmp_path / "ref", **common), load_tokenizer(tiny_config(tmp_path).encoder_path),
                        progress=False, log=lambda *a, **k: None)
    reference.run()
    cfg = tiny_config(tmp_path / "killed", **common)
    path = write_config(tmp_path / "killed.json", cfg)
    metrics = pathlib.Path(cfg.model_path) / "metrics.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}

    def records():
        return [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []

    proc = subprocess.Popen([sys.executable, "main.py", "--model", str(path)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    checkpoints = pathlib.Path(cfg.model_path) / "checkpoints"
    # Killed once step 2's scores are logged and step 3's checkpoint is complete (saves are asynchronous).
    while not (any("task_hellaswag_acc_norm" in r for r in records()) and (checkpoints / "3").is_dir()):
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    assert not any(r.get("step") == 6 for r in records())  # killed before the end
    rerun = subprocess.run([sys.executable, "main.py", "--model", str(path)], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    resumed_at = re.search(r"resumed from .* at step (\d+)", rerun.stdout + rerun.stderr)
    assert resumed_at and 3 <= int(resumed_at.group(1)) < 6  # it went on from the killed run's checkpoint
    keys = ("task_hellaswag_acc_norm", "task_lambada_acc", "task_lambada_perplexity")
    want = [(r["step"], *(r[k] for k in keys)) for r in map(json.loads, open(
        pathlib.Path(reference.cfg.model_path) / "metrics.jsonl")) if keys[0] in r]
    got = [(r["step"], *(r[k] for k in keys)) for r in records() if keys[0] in r]
    assert [w[0] for w in want] == [2, 4, 6]
    assert got == want


def test_unknown_task_in_the_config_stops_training_before_it_starts(tmp_path):
    from gpt2train.tokenizer import load_tokenizer
    cfg = tiny_config(tmp_path, eval_tasks=["lambda"])
    with pytest.raises(UserError, match="unknown task 'lambda'"):
        Trainer(cfg, load_tokenizer(cfg.encoder_path), progress=False, log=lambda *a: None)


def test_two_hosts_score_their_shares_and_agree_with_one(tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tests = REPO / "tests"
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, str(tests / "multihost_tasks_worker.py"), str(tests), str(port), str(pid),
                               str(tmp_path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for pid in (0, 1)]
    seen = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        seen.append(json.loads(out.split("RESULT ", 1)[1]))
    assert [s["process"] for s in seen] == [0, 1] and all(s["devices"] == 2 for s in seen)
    from gpt2train.tasks.run import TaskRunner
    from gpt2train.tokenizer import load_tokenizer
    cfg = tiny_config(tmp_path, eval_batch_size=2)
    alone = TaskRunner(cfg, load_tokenizer(cfg.encoder_path), ["hellaswag", "lambada"], limit=10,
                       task_data=str(FIXTURES)).run(initial_params(cfg))
    for s in seen:
        for name, metrics in alone.items():
            for k, v in metrics.items():
                if k not in ("items_per_s", "data"):
                    assert s["results"][name][k] == pytest.approx(v, rel=1e-5), (name, k)
