"""What the training loop does besides stepping: each a hook that runs every N steps, at the end
of a run, or both.

The loop (train.Trainer.run) calls, after step s:

    hook(trainer, s, final)   for every hook whose due(s, final) is true, in list order

`final` is true at the last step the run will take: max_steps, run(until=...), or a stop that
a signal or a hook asked for (trainer.request_stop). A hook that asks to stop at step s makes s
the last step: the end-of-run hooks that had not run yet (a checkpoint) then run at s too.
Time a hook spends is left out of the throughput figures. The standard hooks are built from
the config by `standard_hooks`; a new kind of periodic work (samples, task scores) is one more
Hook subclass added with Trainer.add_hook, never an edit of the loop.
"""

from __future__ import annotations

import time

from .config import Config


class Hook:
    """Runs every `every` steps (0: never periodically) and, with `at_end`, at the last step."""

    every: int = 0
    at_end: bool = True

    def due(self, step: int, final: bool) -> bool:
        return bool(self.every and step % self.every == 0) or (final and self.at_end)

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
        results = self._runner.run(trainer.state["params"])
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
    """Stop after `seconds` of training, not counting the first (compiling) step."""

    at_end = False

    def __init__(self, seconds: float):
        self.seconds, self._deadline = seconds, None

    def wants_stop(self, trainer, step):
        if self._deadline is None:
            self._deadline = time.perf_counter() + self.seconds
            return None
        if time.perf_counter() >= self._deadline:
            return f"the time limit of {self.seconds:g} s"
        return None


def standard_hooks(cfg: Config, *, evaluate: bool, agree=None) -> list[Hook]:
    """Metrics every `iterations` steps, evaluation every `train_steps` (with eval data), task
    scores every `eval_tasks_every` (with eval_tasks), a checkpoint every `checkpoint_every` steps
    (0: with every evaluation); each also at the end. With checkpoint_every_seconds, also a
    checkpoint when that much time passed since the last."""
    hooks: list[Hook] = [LogMetrics(cfg.iterations)]
    if evaluate:
        hooks.append(Evaluate(cfg.train_steps))
    if cfg.eval_tasks:
        hooks.append(TaskScores(cfg))
    if cfg.checkpoint_every_seconds:  # one host reads its clock every step; several agree at log steps
        hooks.append(CheckpointEverySeconds(cfg.checkpoint_every_seconds, 1 if agree is None else cfg.iterations,
                                            agree or (lambda due: due)))
    hooks.append(Checkpoint(cfg.checkpoint_every or cfg.train_steps))
    return hooks
