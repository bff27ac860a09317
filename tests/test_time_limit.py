"""max_train_seconds / --time_limit: a run stops at the first step past its budget, saves and exits
0; a rerun gets the budget afresh, or with time_limit_total only what is left of it."""

import json

import pytest

from conftest import tiny_config, write_config
from gpt2train.checkpoint import Checkpointer
from gpt2train.cli import run_main
from gpt2train.config import Config, load_config, parse_duration
from gpt2train.errors import UserError
from gpt2train.train import Trainer


def test_durations():
    assert parse_duration("50m") == 3000
    assert parse_duration("1h30m") == 5400
    assert parse_duration("90s") == parse_duration("90") == parse_duration(90) == 90
    assert parse_duration("2.5h") == 9000
    for bad in ("", "m", "5 minutes", "1d"):
        with pytest.raises(UserError, match="duration such as 50m"):
            parse_duration(bad)
    assert Config().replace(time_limit="20m").max_train_seconds == 1200  # the alias takes durations too


def test_time_limit_stops_saves_and_exits_zero_then_total_counts_across_restarts(tmp_path, gpt2_tokenizer, capsys):
    cfg = tiny_config(tmp_path, max_steps=100_000, train_steps=100_000, iterations=5, plot_every_eval=False,
                      prefetch=0)
    config = write_config(tmp_path / "cfg.json", cfg)
    assert run_main(["train", "--model", str(config), "--time_limit", "1.5s", "--time_limit_total", "true"]) == 0
    out = capsys.readouterr().out
    first = Checkpointer(cfg).latest_step()
    assert 1 < first < 1000 and f"stopped at step {first}: the time limit of 1.5 s (counted across restarts)" in out
    ckpt = Checkpointer(cfg)
    used = ckpt.read_meta(first)["hooks"]["train_seconds"]
    ckpt.close()
    assert 1.5 <= used < 30  # the time up to the step it stopped at, kept in the checkpoint

    # Counted across restarts: the budget is spent, so the rerun trains nothing (and says why).
    lines = []
    total = load_config(str(config), {"max_train_seconds": 1.5, "time_limit_total": True})
    result = Trainer(total, gpt2_tokenizer, progress=False, log=lines.append).run()
    assert result.step == first and any("time budget of 1.5 s is used up" in line for line in lines), lines
    # A larger total budget trains only what is left of it.
    result = Trainer(total.replace(max_train_seconds=used + 1.0), gpt2_tokenizer, progress=False,
                     log=lines.append).run()
    assert result.step > first and any("counted across restarts" in line for line in lines)

    # Counted afresh (the default): a rerun gets the whole budget again.
    again = Trainer(load_config(str(config), {"max_train_seconds": 1.5}), gpt2_tokenizer, progress=False,
                    log=lines.append).run()
    assert again.step > result.step and "the time limit of 1.5 s" in lines[-1]
    steps = [json.loads(line)["step"] for line in open(tmp_path / "model" / "metrics.jsonl")]
    assert steps == sorted(steps)  # one timeline: the steps never go back
