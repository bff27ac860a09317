"""keep_best and early_stop_patience on a real run whose held-out loss goes up after its second
step (lr 0.1 overshoots: eval losses 9.08, 10.42, 10.82, ... at steps 2, 4, 6), and
--checkpoint best|last|STEP in generate, evaluate and export."""

import json

import jax
import numpy as np
import pytest

from conftest import tiny_config, write_config
from gpt2train.checkpoint import BEST, Checkpointer, load_params
from gpt2train.cli import guarded, run_main
from gpt2train.errors import UserError
from gpt2train.train import Trainer


def eval_records(cfg):
    lines = (open(cfg.model_path + "/metrics.jsonl").read().splitlines())
    return [r for r in map(json.loads, lines) if "eval_loss" in r]


@pytest.fixture(scope="module")
def stopped(tmp_path_factory, gpt2_tokenizer):
    tmp = tmp_path_factory.mktemp("best")
    cfg = tiny_config(tmp, max_steps=16, train_steps=2, iterations=2, lr=0.1, warmup_steps=1, keep_checkpoints=5,
                      keep_best=True, early_stop_patience=2, plot_every_eval=False)
    lines = []
    result = Trainer(cfg, gpt2_tokenizer, progress=False, log=lines.append).run()
    return cfg, result, lines, tmp


def test_early_stop_after_patience_evaluations_without_improvement(stopped):
    cfg, result, lines, _ = stopped
    evals = eval_records(cfg)
    losses = [r["eval_loss"] for r in evals]
    best = int(np.argmin(losses))
    # It stopped at the evaluation that made `patience` in a row without a lower loss, not at max_steps.
    assert result.step == evals[best]["step"] + 2 * cfg.train_steps < cfg.max_steps
    assert [r["step"] for r in evals][-1] == result.step
    assert all(loss >= losses[best] for loss in losses[best + 1:])
    assert any("early stop" in line and f"step {evals[best]['step']}" in line for line in lines), lines
    assert Checkpointer(cfg).latest_step() == result.step  # saved where it stopped


def test_best_checkpoint_holds_the_lowest_eval_loss_parameters(stopped):
    cfg, result, _, _ = stopped
    evals = eval_records(cfg)
    best_step = min(evals, key=lambda r: r["eval_loss"])["step"]
    best = Checkpointer(cfg, create=False, name=BEST)
    assert best.all_steps() == [best_step]  # one best, beside the rolling checkpoints
    best.close()
    params, step = load_params(cfg, which="best")
    rolling, same = load_params(cfg, which=best_step)  # the rolling checkpoint of that step, still kept
    assert step == same == best_step
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, rolling)
    last, last_step = load_params(cfg)
    assert last_step == result.step
    assert not np.array_equal(np.asarray(last["wte"]), np.asarray(params["wte"]))


def test_checkpoint_flag_in_evaluate_generate_export(stopped, capsys):
    cfg, result, _, tmp = stopped
    config = write_config(tmp / "cfg.json", cfg)
    evals = {r["step"]: r["eval_loss"] for r in eval_records(cfg)}
    best_step = min(evals, key=evals.get)
    for which, step in (("best", best_step), (str(result.step), result.step)):  # "last" is the default, tested elsewhere
        assert run_main(["evaluate", "--model", str(config), "--checkpoint", which, "--json"]) == 0
        got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert got["step"] == step
    assert run_main(["generate", "--model", str(config), "--checkpoint", "best", "--predict_text", "def",
                     "--length", "3"]) == 0
    assert "SAMPLE 0" in capsys.readouterr().out
    assert run_main(["export", "--model", str(config), "--checkpoint", "best", "--out", str(tmp / "hf")]) == 0
    assert f"exported step {best_step}" in capsys.readouterr().out
    # A step that is not kept, and a word that is not a checkpoint: one line each, exit 2.
    assert guarded(run_main, ["evaluate", "--model", str(config), "--checkpoint", "1"]) == 2
    assert "no checkpoint of step 1" in capsys.readouterr().err
    assert guarded(run_main, ["evaluate", "--model", str(config), "--checkpoint", "first"]) == 2
    assert "give best, last or a step number" in capsys.readouterr().err


def test_resumed_run_remembers_the_best_and_the_count(stopped, gpt2_tokenizer):
    cfg, result, _, _ = stopped
    lines = []
    again = Trainer(cfg, gpt2_tokenizer, progress=False, log=lines.append)
    before = dict(again.hook_state["best"])
    assert before["evals_since"] == 2
    again.run(until=result.step + cfg.train_steps)
    after = again.hook_state["best"]
    # The next evaluation either beats the remembered best or counts on from 2 (and stops again).
    assert after["eval_loss"] < before["eval_loss"] or after["evals_since"] == 3


def test_best_needs_evaluation(tmp_path, gpt2_tokenizer):
    cfg = tiny_config(tmp_path, keep_best=True, eval_data_path=None)
    with pytest.raises(UserError, match="eval_data_path"):
        Trainer(cfg, gpt2_tokenizer, progress=False)
    cfg = tiny_config(tmp_path)
    with pytest.raises(UserError, match="no best checkpoint"):
        load_params(cfg, which="best")
