import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gpt2train.checkpoint import Checkpointer
from gpt2train.errors import UserError
from gpt2train.optimizers import make_optimizer
from gpt2train.hooks import Hook
from gpt2train.train import NonFiniteLoss, Trainer, init_state, make_train_step
from conftest import tiny_config


def losses(result):
    return [h["loss"] for h in result.history]


def test_tiny_model_overfits_small_text(tmp_path, gpt2_tokenizer):
    text = ("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
            "How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow. ") * 2
    (tmp_path / "tiny.txt").write_text(text)
    cfg = tiny_config(tmp_path, data_path=str(tmp_path / "tiny.txt"), eval_data_path=None, eval_steps=0,
                      max_steps=150, train_steps=150, iterations=50, warmup_steps=10, lr=3e-3,
                      weight_decay=0.0, min_lr_ratio=1.0, n_ctx=32, train_batch_size=4)
    result = Trainer(cfg, gpt2_tokenizer, progress=False, log=lambda *a, **k: None).run()
    assert result.step == 150
    assert losses(result)[0] > 9.0          # starts near ln(50257) = 10.8
    assert np.mean(losses(result)[-10:]) < 0.1  # and memorises the text


def test_resumed_run_matches_uninterrupted_run_step_for_step(tmp_path, gpt2_tokenizer):
    # Dropout on, so the RNG stream must continue exactly too.
    common = dict(max_steps=8, train_steps=4, checkpoint_every=4, embed_dropout=0.1, attn_dropout=0.1,
                  res_dropout=0.1)
    quiet = dict(progress=False, log=lambda *a, **k: None)
    whole = Trainer(tiny_config(tmp_path / "a", **common), gpt2_tokenizer, **quiet).run()
    cfg_b = tiny_config(tmp_path / "b", **common)
    first = Trainer(cfg_b, gpt2_tokenizer, **quiet).run(until=3)     # stops mid-interval, saves step 3
    assert first.step == 3
    second = Trainer(cfg_b, gpt2_tokenizer, **quiet)
    assert second.step == 3
    rest = second.run()
    assert rest.step == 8
    np.testing.assert_allclose(losses(first) + losses(rest), losses(whole), rtol=0, atol=1e-6)
    assert rest.eval_loss == pytest.approx(whole.eval_loss, abs=1e-6)
    assert Checkpointer(cfg_b).latest_step() == 8
    # Rerunning a finished run does nothing and keeps the state.
    again = Trainer(cfg_b, gpt2_tokenizer, **quiet).run()
    assert again.step == 8 and again.history == []


def test_relative_model_path(tmp_path, gpt2_tokenizer, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tiny_config(tmp_path, model_path="runs/rel", max_steps=2, train_steps=1)
    Trainer(cfg, gpt2_tokenizer, progress=False, log=lambda *a, **k: None).run()
    assert Trainer(cfg, gpt2_tokenizer, progress=False, log=lambda *a, **k: None).step == 2
    assert (tmp_path / "runs" / "rel" / "checkpoints" / "2").is_dir()


def test_metrics_file_has_loss_lr_throughput(tmp_path, gpt2_tokenizer):
    import json
    cfg = tiny_config(tmp_path, max_steps=4, iterations=2, train_steps=2)
    Trainer(cfg, gpt2_tokenizer, progress=False, log=lambda *a, **k: None).run()
    lines = [json.loads(x) for x in (tmp_path / "model" / "metrics.jsonl").read_text().splitlines()]
    train_lines = [x for x in lines if "tokens_per_s" in x]
    assert [x["step"] for x in train_lines] == [2, 4]
    for x in train_lines:
        assert x["loss"] > 0 and x["ppl"] == pytest.approx(np.exp(x["loss"])) and 0 < x["mfu"] < 1
        assert x["lr"] > 0 and x["grad_norm"] > 0 and x["tokens_per_s"] > 0
    assert [x["step"] for x in lines if "eval_loss" in x] == [2, 4]
    assert [x["step"] for x in lines if "first_step_s" in x] == [1]
    assert list((tmp_path / "model" / "tensorboard").iterdir())


# A run that stops for good at step 3, after its checkpoint of step 2 is complete and the metrics
# of step 3 are written: it announces itself with a file and waits there to be killed.
_KILLED_AT_STEP_3 = """
import sys, time
from gpt2train.config import load_config
from gpt2train.hooks import Hook
from gpt2train.tokenizer import load_tokenizer
from gpt2train.train import Trainer

class WaitAtStep3(Hook):
    every = 3
    at_end = False

    def __call__(self, trainer, step, final):
        trainer.ckpt.wait()
        open(sys.argv[2], "w").close()
        time.sleep(600)

cfg = load_config(sys.argv[1])
Trainer(cfg, load_tokenizer(cfg.encoder_path), progress=False, hooks=[WaitAtStep3()]).run()
"""


def test_resume_after_a_hard_kill_keeps_one_metrics_record_per_step(tmp_path, gpt2_tokenizer):
    """A run killed (SIGKILL) after its last checkpoint has logged a step it will train again on
    resume; the resumed run drops that record and writes its own, one record per step."""
    import json
    import signal
    import subprocess
    import sys
    import time
    from conftest import REPO, write_config
    quiet = dict(progress=False, log=lambda *a, **k: None)
    cfg = tiny_config(tmp_path, max_steps=6, iterations=1, train_steps=2, checkpoint_every=2, eval_steps=0)
    reached = tmp_path / "at_step_3"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_AT_STEP_3, str(write_config(tmp_path / "c.json", cfg)),
                             str(reached)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not reached.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert reached.exists(), proc.stderr.read() if proc.poll() is not None else "step 3 not reached in time"
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    path = tmp_path / "model" / "metrics.jsonl"
    records = lambda: [json.loads(x) for x in path.read_text().splitlines() if "loss" in json.loads(x)]  # noqa: E731
    assert [r["step"] for r in records()] == [1, 2, 3]  # step 3 is past the checkpoint
    assert Checkpointer(cfg).latest_step() == 2
    Trainer(cfg, gpt2_tokenizer, **quiet).run()
    after = records()
    assert [r["step"] for r in after] == [1, 2, 3, 4, 5, 6]  # one record per step, in order
    assert "first_step_s" in after[2]  # step 3's record is the resumed run's first step, not the killed run's


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    cfg = tiny_config(tmp_path, train_batch_size=8, grad_clip=0.0)
    batch = jax.random.randint(jax.random.PRNGKey(0), (8, cfg.n_ctx + 1), 0, cfg.n_vocab)
    out = {}
    for accum in (1, 4):
        c = cfg.replace(grad_accum_steps=accum)
        tx = make_optimizer(c)
        state = jax.jit(lambda: init_state(c, tx))()
        new_state, metrics = jax.jit(make_train_step(c, tx))(state, batch)
        out[accum] = (new_state["params"], metrics)
    np.testing.assert_allclose(out[1][1]["loss"], out[4][1]["loss"], rtol=1e-5)
    np.testing.assert_allclose(out[1][1]["grad_norm"], out[4][1]["grad_norm"], rtol=1e-4)
    for a, b in zip(jax.tree.leaves(out[1][0]), jax.tree.leaves(out[4][0])):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_nan_loss_stops_with_clear_error_and_keeps_good_checkpoint(tmp_path, gpt2_tokenizer):
    quiet = dict(progress=False, log=lambda *a, **k: None)
    good = tiny_config(tmp_path, max_steps=2, checkpoint_every=2, train_steps=2, warmup_steps=0,
                       grad_clip=0.0, opt_name="adafactor", beta1=0.0, weight_decay=0.0)
    Trainer(good, gpt2_tokenizer, **quiet).run()
    # Resumed with an absurd learning rate, the parameters overflow within a step or two.
    cfg = good.replace(max_steps=20, lr=1e30)
    with pytest.raises(NonFiniteLoss) as e:
        Trainer(cfg, gpt2_tokenizer, **quiet).run()
    msg = str(e.value)
    assert ("loss became" in msg or "parameters became non-finite" in msg) and "Lower lr" in msg
    assert "checkpoint is step 2" in msg and Checkpointer(cfg).latest_step() == 2
    state = Trainer(cfg, gpt2_tokenizer, **quiet).state  # the saved state is the good one
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(state["params"]))


def test_vocab_mismatch_and_missing_model_path(tmp_path, gpt2_tokenizer):
    with pytest.raises(UserError, match="set n_vocab to 50257"):
        Trainer(tiny_config(tmp_path, n_vocab=1000), gpt2_tokenizer)
    with pytest.raises(UserError, match="model_path"):
        Trainer(tiny_config(tmp_path, model_path=""), gpt2_tokenizer)


def test_damaged_checkpoint_is_a_clear_error(tmp_path, gpt2_tokenizer):
    import shutil
    quiet = dict(progress=False, log=lambda *a, **k: None)
    cfg = tiny_config(tmp_path, max_steps=2, train_steps=1)
    Trainer(cfg, gpt2_tokenizer, **quiet).run()
    state_dir = tmp_path / "model" / "checkpoints" / "2" / "state"
    for child in state_dir.iterdir():  # the arrays are gone, the directory looks complete
        if child.is_dir():
            shutil.rmtree(child)
        elif child.name != "_METADATA":
            child.unlink()
    with pytest.raises(UserError, match="checkpoint of step 2 .* cannot be read"):
        Trainer(cfg, gpt2_tokenizer, **quiet)


def test_resume_with_other_shape_is_refused(tmp_path, gpt2_tokenizer):
    quiet = dict(progress=False, log=lambda *a, **k: None)
    Trainer(tiny_config(tmp_path, max_steps=2), gpt2_tokenizer, **quiet).run()
    with pytest.raises(UserError, match="n_layer: checkpoint 2 vs config 3"):
        Trainer(tiny_config(tmp_path, max_steps=4, n_layer=3), gpt2_tokenizer, **quiet)


@pytest.mark.parametrize("opt", [dict(opt_name="adafactor", decay_type="pow"),
                                 dict(opt_name="adafactor", decay_type="adam", beta1=0.9, weight_decay=0.01),
                                 dict(opt_name="adam", weight_decay=0.0),
                                 dict(opt_name="adamw", precision="bfloat16", grad_accum_steps=2)])
def test_every_optimizer_lowers_the_loss(tmp_path, gpt2_tokenizer, opt):
    cfg = tiny_config(tmp_path, max_steps=12, eval_steps=0, iterations=4, lr=3e-3, **opt)
    result = Trainer(cfg, gpt2_tokenizer, progress=False, log=lambda *a, **k: None).run()
    ls = losses(result)
    assert np.mean(ls[-3:]) < ls[0] - 0.5


def test_a_metric_added_to_the_train_step_reaches_jsonl_and_tensorboard(tmp_path, gpt2_tokenizer, monkeypatch):
    import json
    from gpt2train import train

    def with_param_norm(cfg, tx):
        step = make_train_step(cfg, tx)

        def wrapped(state, batch):
            new_state, metrics = step(state, batch)
            return new_state, {**metrics, "param_norm": optax.tree.norm(new_state["params"])}
        return wrapped

    monkeypatch.setattr(train, "make_train_step", with_param_norm)
    cfg = tiny_config(tmp_path, max_steps=4, iterations=2, train_steps=4)
    result = Trainer(cfg, gpt2_tokenizer, progress=False, log=lambda *a, **k: None).run()
    per_step = [h["param_norm"] for h in result.history]
    lines = [json.loads(x) for x in (tmp_path / "model" / "metrics.jsonl").read_text().splitlines()]
    logged = [x for x in lines if "tokens_per_s" in x]
    assert [x["step"] for x in logged] == [2, 4]
    # averaged over its window like the loss (steps 2 and 3-4: the first step is logged alone)
    assert logged[0]["param_norm"] == pytest.approx(per_step[1])
    assert logged[1]["param_norm"] == pytest.approx(np.mean(per_step[2:4]))
    assert [step for step, _ in tensorboard_scalars(tmp_path / "model" / "tensorboard", "param_norm")] == [1, 2, 4]


def tensorboard_scalars(directory, tag):
    """(step, value) of a scalar in the TensorBoard event files of a directory (read with our own
    TFRecord reader: event files are TFRecords of Event protos)."""
    from tensorboardX.proto import event_pb2
    from gpt2train.records import iter_records
    out = []
    for path in sorted(directory.iterdir()):
        for payload in iter_records(str(path)):
            event = event_pb2.Event.FromString(payload)
            out += [(event.step, v.simple_value) for v in event.summary.value if v.tag == tag]
    return out


class Recorder(Hook):
    def __init__(self, every, at_end=True, stop_at=None):
        self.every, self.at_end, self.stop_at, self.calls = every, at_end, stop_at, []

    def __call__(self, trainer, step, final):
        self.calls.append((step, final, trainer.step))
        if step == self.stop_at:
            trainer.request_stop("enough")


def test_hooks_run_at_their_interval_and_at_the_end(tmp_path, gpt2_tokenizer):
    every3, end_only = Recorder(3), Recorder(0)
    cfg = tiny_config(tmp_path, max_steps=7, train_steps=100, checkpoint_every=100, eval_steps=0)
    Trainer(cfg, gpt2_tokenizer, progress=False, log=lambda *a, **k: None, hooks=[every3, end_only]).run()
    assert every3.calls == [(3, False, 3), (6, False, 6), (7, True, 7)]
    assert end_only.calls == [(7, True, 7)]
    assert Checkpointer(cfg).latest_step() == 7  # the checkpoint hook ran at the end


def test_a_hook_that_asks_to_stop_ends_the_run_with_a_checkpoint(tmp_path, gpt2_tokenizer):
    stopper, later = Recorder(2, stop_at=4), Recorder(0)
    cfg = tiny_config(tmp_path, max_steps=10, train_steps=100, checkpoint_every=100, eval_steps=0)
    result = Trainer(cfg, gpt2_tokenizer, progress=False, log=lambda *a, **k: None,
                     hooks=[stopper, later]).run()
    assert result.step == 4 and stopper.calls == [(2, False, 2), (4, False, 4)]
    assert later.calls == [(4, True, 4)]  # the end-of-run hooks that had not run did, at step 4
    assert Checkpointer(cfg).latest_step() == 4
    resumed = Trainer(cfg.replace(max_steps=6), gpt2_tokenizer, progress=False, log=lambda *a, **k: None)
    assert resumed.step == 4 and resumed.run().step == 6


def test_time_limit_stops_after_the_first_step_and_saves(tmp_path, gpt2_tokenizer):
    cfg = tiny_config(tmp_path, max_steps=1000, train_steps=1000, eval_steps=0)
    result = Trainer(cfg, gpt2_tokenizer, progress=False, log=lambda *a, **k: None).run(until_seconds=0.0)
    assert result.step == 2  # the first (compiling) step does not count against the limit
    assert Checkpointer(cfg).latest_step() == 2
