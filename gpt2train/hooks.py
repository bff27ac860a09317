"""What the training loop does besides stepping: each a hook that runs every N steps, at the end
of a run, or both.

The loop (train.Trainer.run) calls, after step s:

    hook(trainer, s, final)   for every hook whose due(s, final) is true, in list order

`final` is true at the last step the run will take: max_steps, run(until=...), or a stop that
a signal or a hook asked for (trainer.request_stop). A hook that asks to stop at step s makes s
the last step: the end-of-run hooks that had not run yet (a checkpoint) then run at s too.
Time a hook spends is left out of the throughput figures. The standard hooks are built from
the config by `standard_hooks`; a new kind of periodic work (samples, task scores) is one more
Hook subclass added with Trainer.add_hook, never an edit of the loop. A hook that must remember
something across restarts keeps it in trainer.hook_state, which every checkpoint saves.
"""

from __future__ import annotations

import json
import time
import warnings

from .config import Config
from .errors import UserError


class Hook:
    """Runs every `every` steps (0: never periodically) and, with `at_end`, at the last step."""

    every: int = 0
    at_end: bool = True

    def due(self, step: int, final: bool) -> bool:
        return bool(self.every and step % self.every == 0) or (final and self.at_end)

    def start(self, trainer) -> str | None:
        """Called once when run() begins, before the first step: a reason not to train at all."""
        return None

    def wants_stop(self, trainer, step: int) -> str | None:
        """Asked after every step, before any hook runs: a reason to make this step the last."""
        return None

    def __call__(self, trainer, step: int, final: bool) -> None:
        raise NotImplementedError


class LogMetrics(Hook):
    """The step metrics since the last line, reduced to one record: metrics.jsonl, TensorBoard,
    the progress bar (or a log line when there is no bar)."""

    def __init__(self, every: int):
        self.every = every

    def __call__(self, trainer, step, final):
        line = trainer.window.summary(step)
        if line is None:
            return
        skipped = trainer.train_data.skipped_records
        if skipped:
            line["skipped_records"] = skipped
        line["tokens"] = step * trainer.cfg.train_batch_size * trainer.cfg.n_ctx  # the x axis of `plot`
        trainer.metrics.write(line)
        trainer.show(line)


class Evaluate(Hook):
    """Held-out loss and perplexity on eval_steps batches of the eval data."""

    def __init__(self, every: int):
        self.every = every

    def __call__(self, trainer, step, final):
        ev = trainer.evaluate()
        trainer.metrics.write({"step": step, **ev})
        trainer.note(ev)
        trainer.last_eval = {"step": step, **ev}
        trainer.log(f"step {step}: eval loss {ev['eval_loss']:.4f} perplexity {ev['eval_ppl']:.2f}")


class TaskScores(Hook):
    """The config's eval_tasks (lambada, hellaswag, ...) on the current parameters: one
    `task_NAME_METRIC` record in metrics.jsonl and TensorBoard, the headline figures on the
    progress line. The data is fetched and tokenized at the first call, the programs compiled
    once; on several hosts each puts its share of every batch (tasks.scorer)."""

    def __init__(self, cfg: Config):
        from .tasks.run import check_names
        self.every = cfg.eval_tasks_every or cfg.train_steps
        self.names = check_names(cfg.eval_tasks)  # an unknown name fails before training starts
        self._runner = None

    def __call__(self, trainer, step, final):
        from .tasks.run import TaskRunner, flat, headline
        cfg = trainer.cfg
        if self._runner is None:
            self._runner = TaskRunner(cfg, trainer.tokenizer, self.names, task_data=cfg.task_data or None,
                                      limit=cfg.eval_tasks_items, mesh=trainer.mesh, log=trainer.log)
        results = self._runner.run(trainer.params)
        figures = flat(results)
        trainer.metrics.write({"step": step, **figures})
        trainer.note(figures)
        shown = {name: headline(name, metrics) for name, metrics in results.items()}
        trainer.shown_tasks.update({name: f"{v:.3f}" for name, v in shown.items() if v is not None})
        trainer.log(f"step {step}: " + " ".join(f"{name} {v}" for name, v in trainer.shown_tasks.items()))


class Checkpoint(Hook):
    """Save the train state and the data position (atomic; the last keep_checkpoints are kept)."""

    def __init__(self, every: int):
        self.every = every

    def __call__(self, trainer, step, final):
        trainer.save()


class CheckpointEverySeconds(Hook):
    """Save when `seconds` have passed since the last save (by any hook), so a slow run loses at
    most that much work whatever checkpoint_every is. The clock is read every `check_every`
    steps, and on several hosts they agree through `agree` (any host's clock decides for all),
    so every host saves at the same step."""

    at_end = False  # the Checkpoint hook saves at the end

    def __init__(self, seconds: float, check_every: int, agree=lambda due: due, clock=time.monotonic):
        self.seconds, self.check_every, self.agree, self.clock = seconds, max(1, check_every), agree, clock
        self.last_save = clock()

    def due(self, step, final):
        if step % self.check_every:
            return False
        return self.agree(self.clock() - self.last_save >= self.seconds)

    def __call__(self, trainer, step, final):
        trainer.save()


class TimeLimit(Hook):
    """Stop at the first step past `seconds` of training, not counting the first (compiling) step
    of a run. With `total`, the time of earlier runs counts too: it is kept in trainer.hook_state,
    so each checkpoint holds the time trained up to it, and a run finding the budget used up
    trains nothing."""

    at_end = False

    def __init__(self, seconds: float, *, total: bool = False):
        self.seconds, self.total = seconds, total
        self._armed, self._before = None, 0.0

    def start(self, trainer):
        self._armed = None
        self._before = float(trainer.hook_state.get("train_seconds", 0.0)) if self.total else 0.0
        if self.total and self._before >= self.seconds:
            return (f"the time budget of {self.seconds:g} s is used up ({self._before:.0f} s trained over restarts; "
                    "time_limit_total): raise max_train_seconds to train on")
        return None

    def wants_stop(self, trainer, step):
        now = time.perf_counter()
        if self._armed is None:  # the run's first step compiled: the clock starts after it
            self._armed = now
            return None
        used = self._before + now - self._armed
        if self.total:
            trainer.hook_state["train_seconds"] = used
        if used >= self.seconds:
            return f"the time limit of {self.seconds:g} s" + (" (counted across restarts)" if self.total else "")
        return None


class BestCheckpoint(Hook):
    """After each evaluation: with `keep`, the parameters with the lowest eval loss so far go to
    model_path/best (one checkpoint, apart from the rolling ones); with `patience`, the run stops
    after that many evaluations without a lower eval loss. The best loss and the count survive
    restarts in trainer.hook_state["best"]."""

    def __init__(self, every: int, *, keep: bool, patience: int):
        self.every, self.keep, self.patience = every, keep, patience
        self._ckpt = None

    def __call__(self, trainer, step, final):
        try:
            self._track(trainer, step, final)
        finally:
            if final and self._ckpt is not None:  # the last save must be complete when the run returns
                self._ckpt.close()
                self._ckpt = None

    def _track(self, trainer, step, final):
        ev = trainer.last_eval
        if ev is None or ev["step"] != step:
            return
        loss, best = ev["eval_loss"], trainer.hook_state.get("best")
        if best is None or loss < best["eval_loss"]:
            trainer.hook_state["best"] = {"step": step, "eval_loss": loss, "evals_since": 0}
            if self.keep:
                self._save(trainer, step, loss)
            return
        best = trainer.hook_state["best"] = {**best, "evals_since": best["evals_since"] + 1}
        if self.patience and best["evals_since"] >= self.patience and not final:
            trainer.request_stop(f"early stop: the eval loss has not gone below {best['eval_loss']:.4f} (step "
                                 f"{best['step']}) in {best['evals_since']} evaluations (early_stop_patience)")

    def _save(self, trainer, step, loss):
        from .checkpoint import BEST, Checkpointer
        if self._ckpt is None:
            self._ckpt = Checkpointer(trainer.cfg, name=BEST)
        # A best of a later step than this one was written by a run this one restarted before: gone.
        self._ckpt.delete_from(step)
        self._ckpt.save(step, {"params": trainer.params}, {}, kind="best", eval_loss=loss,
                        encoder=trainer.tokenizer.fingerprint)
        trainer.log(f"step {step}: lowest eval loss so far ({loss:.4f}); parameters kept in {self._ckpt.dir}")


class SampleText(Hook):
    """Continue `sample_prompts` every `sample_every` steps and at the end, with `sample_options`
    (generate's options); the seed is moved by the step, so a step and a seed give the same text.
    The Generator is built once: its compiled programs serve every later sample."""

    def __init__(self, cfg: Config):
        self.every = cfg.sample_every
        self.prompts = sample_prompts(cfg)
        self.options = sample_options(cfg)
        self._gen = None

    def __call__(self, trainer, step, final):
        from .generate import Generator, format_sample
        if self._gen is None:
            self._gen = Generator(trainer.cfg, trainer.params, trainer.tokenizer)
        else:
            self._gen.use_params(trainer.params)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a long prompt is cut to the context: said once by generate already
            texts = self._gen.generate(self.prompts, self.options.with_seed_offset(step))
        rows = [{"prompt": p, "text": t} for p, t in zip(self.prompts, texts)]
        trainer.metrics.write_samples(step, rows)
        trainer.log(f"step {step}: samples\n" + "".join(format_sample(i, r["prompt"] + r["text"])
                                                       for i, r in enumerate(rows)).rstrip("\n"))


def sample_prompts(cfg: Config) -> list[str]:
    """The prompts of sample_every: the config's list, a JSON list given on the command line,
    or the lines of a file; none: one sample from a document boundary."""
    value = cfg.sample_prompts
    if value is None:
        return [""]
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise UserError(f"sample_prompts {value!r} is neither a JSON list nor a file name ({e})") from None
    if isinstance(value, str):
        import fsspec
        try:
            with fsspec.open(value, "r", encoding="utf-8") as f:
                value = [line for line in f.read().splitlines() if line.strip()]
        except FileNotFoundError:
            raise UserError(f"sample_prompts: no file {value!r}; give a list of prompts or a file with one "
                            "prompt per line") from None
    if not value or not all(isinstance(p, str) for p in value):
        raise UserError(f"sample_prompts must hold at least one prompt (strings), got {cfg.sample_prompts!r}")
    return list(value)


def sample_options(cfg: Config):
    """sample_options (an object, or its JSON text) as SamplingOptions, checked like generate's flags."""
    from .sampling import SamplingOptions, option_fields
    raw = cfg.sample_options or {}
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            raise UserError(f"sample_options must be a JSON object such as {{\"length\": 64}}: {e}") from None
    names = [f.name for f in option_fields()]
    unknown = sorted(set(raw) - set(names)) if isinstance(raw, dict) else ["(not an object)"]
    if unknown:
        raise UserError(f"sample_options: unknown option {', '.join(unknown)}; the options are {', '.join(names)}")
    try:
        return SamplingOptions.from_values(raw, cfg)
    except UserError as e:
        raise UserError(f"sample_options: {e}") from None


class PlotCurves(Hook):
    """Redraw model_path/curves.png (`plot`'s figure of this run) at every evaluation and at the
    end; W&B gets the image too. A missing matplotlib is said once, and training goes on."""

    def __init__(self, every: int):
        self.every, self._off = every, False

    def __call__(self, trainer, step, final):
        if self._off or not trainer.metrics.enabled:
            return
        try:
            from .plot import curves_path, plot_runs
        except ImportError:
            self._off = True
            trainer.log('curves.png is not drawn: matplotlib is not installed (pip install -e ".[plot]"; '
                        "plot_every_eval: false silences this)")
            return
        path = curves_path(trainer.cfg.model_path)
        name = "/".join(trainer.cfg.model_path.rstrip("/").split("/")[-2:])  # e.g. demo_run/model
        try:
            plot_runs([trainer.metrics.path], path, names=[name])
        except (UserError, OSError) as e:  # a picture that cannot be drawn is no reason to stop training
            trainer.log(f"step {step}: curves.png not drawn ({e})")
            return
        trainer.metrics.image("curves", path, step)


class WandbLog(Hook):
    """Weights & Biases: a sink on trainer.metrics (process 0 only) that gets every scalar record,
    the samples and the curves image; the run resumes after a restart (its id is in model_path)."""

    every, at_end = 0, False

    def __init__(self, cfg: Config):
        from .wandb_sink import check_installed
        check_installed(cfg)

    def start(self, trainer):
        if trainer.metrics.enabled:
            from .wandb_sink import WandbSink
            trainer.metrics.add_sink(WandbSink(trainer.cfg))
        return None

    def __call__(self, trainer, step, final):
        pass


def standard_hooks(cfg: Config, *, evaluate: bool, agree=None) -> list[Hook]:
    """Metrics every `iterations` steps, evaluation every `train_steps` (with eval data), task
    scores every `eval_tasks_every` (with eval_tasks), the best checkpoint and early stop after
    evaluations, samples every `sample_every` steps, the curves with each evaluation, W&B, a time
    limit, and a checkpoint every `checkpoint_every` steps (0: with every evaluation); each also
    at the end. With checkpoint_every_seconds, also a checkpoint when that much time passed since
    the last (`agree`: how several hosts agree that it has)."""
    hooks: list[Hook] = [LogMetrics(cfg.iterations)]
    if evaluate:
        hooks.append(Evaluate(cfg.train_steps))
    if cfg.eval_tasks:
        hooks.append(TaskScores(cfg))
    if cfg.keep_best or cfg.early_stop_patience:
        if not evaluate:
            raise UserError("keep_best and early_stop_patience follow the eval loss: set eval_data_path (and "
                            "eval_steps > 0), or drop them")
        hooks.append(BestCheckpoint(cfg.train_steps, keep=cfg.keep_best, patience=cfg.early_stop_patience))
    if cfg.sample_every:
        hooks.append(SampleText(cfg))
    if cfg.plot_every_eval:
        hooks.append(PlotCurves(cfg.train_steps))
    if cfg.wandb_project:
        hooks.append(WandbLog(cfg))
    if cfg.max_train_seconds:
        hooks.append(TimeLimit(cfg.max_train_seconds, total=cfg.time_limit_total))
    if cfg.checkpoint_every_seconds:  # one host reads its clock every step; several agree at log steps
        hooks.append(CheckpointEverySeconds(cfg.checkpoint_every_seconds, 1 if agree is None else cfg.iterations,
                                            agree or (lambda due: due)))
    hooks.append(Checkpoint(cfg.checkpoint_every or cfg.train_steps))
    return hooks
