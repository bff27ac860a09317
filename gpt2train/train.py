"""The training loop: jitted step, periodic evaluation, metrics, checkpoints, exact resume.

Rerunning the same command resumes from the newest checkpoint in model_path with the
optimizer state, step, RNG and data position restored, so the run continues exactly as if
it had never stopped. The loop never waits on the device for the step it just launched: it
reads the previous step's metrics while the current one runs.
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from . import fused_adam, kernels, model
from .checkpoint import Checkpointer, UnreadableCheckpoint, check_encoder
from .config import Config
from .distributed import any_host, preemption_service, reached_stop_point
from .errors import UserError
from .inputs import get_input
from .inputs.prefetch import Prefetched
from .integrity import DamagedCheckpoint
from .paths import check_writable
from .mesh import batch_sharding, check_batch, mesh_for, replicated, state_shardings
from .hooks import Checkpoint, CheckpointEverySeconds, Hook, TimeLimit, standard_hooks
from .metrics import MetricsWriter, ThroughputWindow, peak_flops_per_device, train_flops_per_token
from .optimizers import learning_rate_schedule, make_optimizer


HISTORY_STEPS = 10_000  # per-step metrics kept in memory; a 500k-step run must not grow without bound


# A resume must read the data the saved position points into: these keys decide what it is.
DATA_KEYS = ("input", "data_path", "long_data_path", "data_weights", "stitch", "minimum_size", "seed")


class NonFiniteLoss(UserError):
    """Training produced a non-finite loss or parameters; nothing of that state was saved."""

    @classmethod
    def at(cls, what: str, step: int, ckpt: Checkpointer, cfg: Config, origin: str = "",
           skipped: int = 0) -> "NonFiniteLoss":
        latest = ckpt.latest_step()
        last = f"The last good checkpoint is step {latest} in {ckpt.dir}" if latest is not None else \
            f"No checkpoint was saved yet in {ckpt.dir}"
        inputs = ("every token id fed to the model lay within [0, n_vocab)"
                  + (f" ({skipped} damaged or out-of-range records were skipped)" if skipped else ""))
        return cls(f"{what} at step {step}; this state was not saved. {origin}{inputs}. {last}. Lower lr "
                   f"(now {cfg.lr}), raise warmup_steps, or set grad_clip, then rerun to resume.")


class Interrupted(UserError):
    """A clean stop on SIGINT/SIGTERM after saving; exits non-zero so scripts notice."""


def layered(cfg: Config) -> bool:
    """Whether the train state holds each layer's parameters and Adam moments apart
    (model.split_layers) rather than stacked as checkpoints do: on CPU, where the stack cost a copy
    of every weight and gradient per step (~7% of a 124M bfloat16 step), when every layer is
    unrolled (model.layer_unroll) and the optimizer treats each number alone (Adam, AdamW: the
    same update either way; Adafactor's factored moments and block clipping are per array)."""
    return (cfg.opt_name in ("adam", "adamw") and model.layer_unroll(cfg) == cfg.n_layer
            and kernels.resolve(cfg.kernels) == "cpu")


def _relaid(tree, relay):
    """tree (a state, its parameters) with every parameter tree in it -- the parameters and Adam's
    moments -- through relay."""
    is_params = lambda x: isinstance(x, dict) and "h" in x and "wte" in x  # noqa: E731
    return jax.tree.map(lambda x: relay(x) if is_params(x) else x, tree, is_leaf=is_params)


def for_training(cfg: Config, tree):
    """A state or parameters as checkpoints hold them, in the train step's layout (layered)."""
    return _relaid(tree, model.split_layers) if layered(cfg) else tree


def for_saving(cfg: Config, tree):
    """A state or parameters in the train step's layout, as checkpoints hold them (layers stacked)."""
    return _relaid(tree, model.stack_layers) if layered(cfg) else tree


def initial_params(cfg: Config) -> model.Params:
    """The parameters a run with this config starts from (step 0)."""
    return model.init_params(cfg, jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 0))


def train_state(cfg: Config, tx: optax.GradientTransformation, params) -> dict:
    """A run's state at step 0 from its parameters (stacked, as saved): a fresh optimizer and the
    run's RNG, in the train step's layout (for_training)."""
    params = for_training(cfg, params)
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
            "rng": jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 1)}


def init_state(cfg: Config, tx: optax.GradientTransformation) -> dict:
    """The state at step 0 in the train step's layout; for_saving(cfg, it) is a checkpoint's."""
    return train_state(cfg, tx, initial_params(cfg))


def make_train_step(cfg: Config, tx: optax.GradientTransformation):
    """state, batch [B, n_ctx+1] -> new state, metrics. Accumulates grad_accum_steps micro-batches.
    tx is make_optimizer(cfg): on CPU its adam and adamw steps run as fused_adam's, from cfg."""
    schedule = learning_rate_schedule(cfg)
    use_dropout = max(cfg.embed_dropout, cfg.attn_dropout, cfg.res_dropout) > 0
    accum = cfg.grad_accum_steps
    fused = fused_adam.usable(cfg)  # the same update as tx's, in one pass over memory (fused_adam.py)

    def loss_fn(params, batch, key):
        return model.token_losses(params, batch, cfg, key=key if use_dropout else None).mean()

    grad_fn = jax.value_and_grad(loss_fn)

    def step(state, batch):
        key = jax.random.fold_in(state["rng"], state["step"])
        params = state["params"]
        if accum == 1:
            loss, grads = grad_fn(params, batch, key)
        else:
            micro = batch.reshape(accum, batch.shape[0] // accum, batch.shape[1])

            def add(carry, xs):
                mb, i = xs
                loss, grads = grad_fn(params, mb, jax.random.fold_in(key, i))
                return jax.tree.map(jnp.add, carry, (loss, grads)), None

            zero = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, params))
            (loss, grads), _ = jax.lax.scan(add, zero, (micro, jnp.arange(accum)))
            loss, grads = jax.tree.map(lambda x: x / accum, (loss, grads))
        grad_norm = optax.tree.norm(grads)
        if fused and fused_adam.matches(state["opt_state"]):
            new_params, opt_state = fused_adam.apply(cfg, grads, state["opt_state"], params, grad_norm)
        else:
            updates, opt_state = tx.update(grads, state["opt_state"], params)
            new_params = optax.apply_updates(params, updates)
        new_state = {"step": state["step"] + 1, "params": new_params, "opt_state": opt_state, "rng": state["rng"]}
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state["step"])}
        return new_state, metrics

    return step


def make_eval_step(cfg: Config):
    def eval_step(params, batch):
        return model.token_losses(params, batch, cfg).mean()
    return eval_step


@jax.jit
def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]))


@contextlib.contextmanager
def stop_on_signals(request_stop, *, hosts_agree: bool = False):
    """Ctrl-C and SIGTERM call request_stop(signum) instead of killing the run, which then
    finishes its step and saves. Signals reach only the main thread; elsewhere this does nothing.

    With `hosts_agree` (several hosts, JAX's preemption service on), SIGTERM is left to JAX's
    notifier, which makes every host stop at one agreed step (distributed.reached_stop_point),
    and Ctrl-C on any host is passed to it as a SIGTERM."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if hosts_agree:
        handlers = {signal.SIGINT: lambda signum, _frame: os.kill(os.getpid(), signal.SIGTERM)}
    else:
        handlers = {s: (lambda signum, _frame: request_stop(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    old = {s: signal.signal(s, h) for s, h in handlers.items()}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


@dataclass
class RunResult:
    step: int
    last_loss: float | None
    eval_loss: float | None
    history: list  # per-step metrics of this call, the last HISTORY_STEPS at most
    skipped_records: int = 0  # damaged records passed over (skip_corrupt_records)


@dataclass
class StopRequest:
    reason: str
    signal: int | None = None  # a stop by signal exits non-zero (Interrupted) after saving


class Trainer:
    def __init__(self, cfg: Config, tokenizer, *, progress: bool = True, log=print, devices=None,
                 hooks: Sequence[Hook] = ()):
        if not cfg.model_path:
            raise UserError("model_path is empty: set it in the config to the directory for checkpoints")
        check_writable(cfg.model_path, "model_path")  # before reading any data: a read-only disk fails now
        self.cfg, self.tokenizer, self.progress, self.log = cfg, tokenizer, progress, log
        if jax.process_index() != 0:  # one host speaks for the run
            self.progress, self.log = False, lambda *a, **k: None
        if tokenizer.n_vocab != cfg.n_vocab:
            raise UserError(f"n_vocab is {cfg.n_vocab} in the config but the tokenizer in "
                            f"{cfg.encoder_path} has {tokenizer.n_vocab} tokens; set n_vocab to {tokenizer.n_vocab}")
        self.mesh = mesh_for(cfg, devices)
        check_batch("train_batch_size / grad_accum_steps", cfg.train_batch_size // cfg.grad_accum_steps, self.mesh)
        self.tx = make_optimizer(cfg)
        make_source = get_input(cfg.input)
        hosts = {"process_index": jax.process_index(), "process_count": jax.process_count()}
        self.train_data = make_source(cfg, "train", tokenizer, **hosts)
        if cfg.prefetch:
            self.train_data = Prefetched(self.train_data, cfg.prefetch)
        self.eval_data = None
        if cfg.eval_steps > 0 and cfg.eval_data_path:
            check_batch("eval_batch_size", cfg.eval_batch_size, self.mesh)
            self.eval_data = make_source(cfg, "eval", tokenizer, **hosts)
        self.hooks = standard_hooks(cfg, evaluate=self.eval_data is not None,
                                    agree=any_host if jax.process_count() > 1 else None)
        for hook in hooks:
            self.add_hook(hook)
        self.metrics = MetricsWriter(cfg.model_path, enabled=jax.process_index() == 0)  # one writer per run
        self.ckpt = Checkpointer(cfg)
        self.history: collections.deque = collections.deque(maxlen=HISTORY_STEPS)
        self._stop: StopRequest | None = None
        self._last_loss = self._eval_loss = None
        self.shown_tasks: dict[str, str] = {}  # task headline figures the progress line repeats (hooks.TaskScores)
        self._saved_step = None
        self.origin = "It started from freshly initialised parameters; "  # what the NaN message says of the start
        self.last_eval: dict | None = None  # {"step", "eval_loss", "eval_ppl"} of the newest evaluation
        self.hook_state: dict = {}  # what hooks keep across restarts: saved in, and restored from, each checkpoint

        rep, data = replicated(self.mesh), batch_sharding(self.mesh)
        self._batch_sharding = data
        # Parameters and optimizer state sharded along fsdp (replicated when it is 1), in the train
        # step's layout and in a checkpoint's (for_training, for_saving).
        abstract = jax.eval_shape(lambda: init_state(cfg, self.tx))
        self.state_shardings = state_shardings(self.mesh, abstract)
        self.saved_shardings = state_shardings(self.mesh, jax.eval_shape(lambda s: for_saving(cfg, s), abstract))
        self._for_saving = jax.jit(lambda state: for_saving(cfg, state), out_shardings=self.saved_shardings)
        self._params_for_saving = jax.jit(lambda params: for_saving(cfg, params),
                                          out_shardings=self.saved_shardings["params"])
        self._for_training = jax.jit(lambda state: for_training(cfg, state), out_shardings=self.state_shardings)
        self.train_step = jax.jit(make_train_step(cfg, self.tx), in_shardings=(self.state_shardings, data),
                                  out_shardings=(self.state_shardings, rep), donate_argnums=0)
        self.eval_step = jax.jit(make_eval_step(cfg), in_shardings=(self.state_shardings["params"], data),
                                 out_shardings=rep)
        try:
            self._state = self._initial_state()
        except BaseException:
            self.ckpt.close()  # release Orbax's background threads before the error propagates
            raise

    def add_hook(self, hook: Hook) -> None:
        """Run `hook` too; it runs before the checkpoint, so a save follows what it did."""
        at = next((i for i, h in enumerate(self.hooks) if isinstance(h, Checkpoint)), len(self.hooks))
        self.hooks.insert(at, hook)

    # ------------------------------------------------------------------ state
    @property
    def state(self) -> dict:
        """The run's state as a checkpoint holds it (layers stacked). The train step's own layout
        may differ (layered): this is then a copy, made at each call."""
        return self._for_saving(self._state) if layered(self.cfg) else self._state

    @property
    def params(self) -> model.Params:
        """The parameters as a checkpoint holds them (a copy when the train step's layout differs)."""
        return self._params_for_saving(self._state["params"]) if layered(self.cfg) else self._state["params"]

    def _initial_state(self):
        if self.ckpt.latest_step() is not None:
            return self._resume()
        if self.cfg.init_from:
            from .pretrained import fit, load_pretrained
            pre = load_pretrained(self.cfg.init_from)
            self.log(f"initialised from the pretrained model {pre.source}")
            self.origin = f"It started from the pretrained model {pre.source}; "
            return self._state_from_params(fit(pre, self.cfg))
        return jax.jit(lambda: init_state(self.cfg, self.tx), out_shardings=self.state_shardings)()

    def _load_step(self, step: int):
        """(state in the train step's layout, metadata) of a saved step, verified against its manifest; a
        converted pretrained model (kind "pretrained") gives its weights with a fresh optimizer at step 0."""
        meta = self.ckpt.read_meta(step)
        if meta.get("kind") == "pretrained":
            params = self.ckpt.restore_params(step, self.saved_shardings["params"])
            return self._state_from_params(params), meta
        shapes = jax.eval_shape(lambda: for_saving(self.cfg, init_state(self.cfg, self.tx)))
        abstract = jax.tree.map(lambda sh, a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                                self.saved_shardings, shapes)
        state, meta = self.ckpt.restore(abstract, step)
        return (self._for_training(state) if layered(self.cfg) else state), meta

    def _newest_intact(self):
        """(step, state, metadata) of the newest checkpoint that reads back as saved. A damaged
        newest one is refused, naming the intact step to fall back to; with resume_fallback the
        damaged steps are moved aside and training resumes from that step."""
        damaged, first_error = [], None
        for step in reversed(self.ckpt.all_steps()):
            try:
                state, meta = self._load_step(step)
            except (DamagedCheckpoint, UnreadableCheckpoint) as e:
                damaged.append(step)
                first_error = first_error or e
                continue
            if damaged and not self.cfg.resume_fallback:
                raise UserError(f"{first_error}. The newest intact checkpoint is step {step}: rerun with "
                                f"--resume_fallback to resume from it (step {', '.join(map(str, damaged))} is then "
                                f"moved to {self.cfg.model_path.rstrip('/')}/damaged_checkpoints)")
            if damaged:
                aside = self.ckpt.move_aside(damaged)
                self.log(f"{first_error}; moved step {', '.join(map(str, damaged))} to {aside} and resuming from "
                         f"step {step}, the newest intact checkpoint (resume_fallback)")
            return step, state, meta
        raise UserError(f"{first_error}. No checkpoint in {self.ckpt.dir} reads back: if the optimizer settings "
                        "(opt_name, grad_clip, weight_decay) changed since, restore them; otherwise start over with a "
                        "new model_path")

    def _resume(self):
        step, state, meta = self._newest_intact()
        check_encoder(meta.get("encoder"), self.tokenizer, step, self.ckpt.dir)
        verified = ("whose arrays matched their checksums" if self.ckpt.verified(step)
                    else "saved without checksums, so not verified")
        if meta.get("kind") == "pretrained":
            self.log(f"starting from the pretrained model in {self.ckpt.dir}")
            self.origin = f"It started from the pretrained model in {self.ckpt.dir} ({verified}); "
            return state
        saved = meta.get("config", {})
        changed = [f"{k}: {saved.get(k)!r} -> {getattr(self.cfg, k)!r}" for k in DATA_KEYS
                   if k in saved and saved[k] != getattr(self.cfg, k)]
        if changed and not self.cfg.allow_data_change:
            raise UserError(f"the checkpoint of step {step} in {self.ckpt.dir} was trained on other data settings "
                            f"({'; '.join(changed)}), so its saved data position would point into other data: "
                            "restore those settings, or rerun with --allow_data_change to keep the weights and "
                            "optimizer and start the new data from its beginning")
        if changed:
            self.log(f"data settings changed ({'; '.join(changed)}): the new data starts from its beginning "
                     "(allow_data_change)")
        else:
            self.train_data.restore(meta["data"])
        self.hook_state = dict(meta.get("hooks", {}))
        self.log(f"resumed from {self.ckpt.dir} at step {step}")
        self.origin = f"It resumed from step {step} ({verified}); "
        dropped = self.metrics.forget_after(step)
        if dropped:
            self.log(f"dropped {dropped} metrics records of steps after {step} (they will be trained again)")
        return state

    def _state_from_params(self, params):
        return jax.jit(lambda p: train_state(self.cfg, self.tx, p), out_shardings=self.state_shardings)(
            jax.tree.map(jnp.asarray, params))

    @property
    def step(self) -> int:
        return int(self._state["step"])

    def _put(self, batch: np.ndarray):
        if jax.process_count() > 1:  # each host holds its own rows of the global batch
            return jax.make_array_from_process_local_data(self._batch_sharding, batch)
        return jax.device_put(batch, self._batch_sharding)

    # ------------------------------------------------------------------ what hooks call
    def evaluate(self) -> dict | None:
        if self.eval_data is None:
            return None
        self.eval_data.reset()
        losses = [self.eval_step(self._state["params"], self._put(self.eval_data.next_batch()))
                  for _ in range(self.cfg.eval_steps)]
        loss = float(np.mean(jax.device_get(losses)))
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}

    def save(self) -> None:
        if self.step == self._saved_step:  # two hooks due at one step (steps and seconds): one save
            return
        self._saved_step = self.step
        # The last update can overflow after a finite loss was reported: never save such a state.
        if not bool(_all_finite(self._state["params"])):
            raise self._non_finite("the parameters became non-finite", self.step)
        self.ckpt.save(self.step, self.state, self.train_data.state(), encoder=self.tokenizer.fingerprint,
                       hooks=self.hook_state)
        for hook in self.hooks:
            if isinstance(hook, CheckpointEverySeconds):
                hook.last_save = hook.clock()

    def _non_finite(self, what: str, step: int) -> NonFiniteLoss:
        return NonFiniteLoss.at(what, step, self.ckpt, self.cfg, self.origin, self.train_data.skipped_records)

    def request_stop(self, reason: str | int) -> None:
        """Make the current step the last: the end-of-run hooks (a checkpoint) run, then run()
        returns; a signal number as the reason raises Interrupted after the save."""
        if self._stop is None:
            signum = reason if isinstance(reason, int) else None
            self._stop = StopRequest(f"signal {reason}" if signum is not None else reason, signum)

    def note(self, values: dict) -> None:
        """Add figures (an evaluation's) to the newest step of the run's history."""
        if self.history:
            self.history[-1].update(values)
        if "eval_loss" in values:
            self._eval_loss = values["eval_loss"]

    def show(self, line: dict) -> None:
        """A metrics record on the progress bar, or as a log line when there is no bar."""
        shown = {"loss": ".3f", "ppl": ".1f", "lr": ".2e", "grad_norm": ".2f", "tokens_per_s": ".0f", "mfu": ".1%"}
        if self.progress:
            names = {"grad_norm": "gnorm", "tokens_per_s": "tok_s"}
            self._bar.set_postfix({**{names.get(k, k): format(line[k], f) for k, f in shown.items() if k in line},
                                   **self.shown_tasks})
            return
        extra = " ".join(f"{k} {v:.4g}" for k, v in line.items()
                         if k not in shown and k not in ("step", "time", "tokens") and isinstance(v, (int, float)))
        self.log(f"step {line['step']}: loss {line['loss']:.4f} ppl {line['ppl']:.2f} lr {line['lr']:.2e} "
                 f"grad_norm {line['grad_norm']:.3f} {line['tokens_per_s']:.0f} tokens/s MFU {line['mfu']:.1%}"
                 + (f" {extra}" if extra else "")
                 + "".join(f" {name} {v}" for name, v in self.shown_tasks.items()))

    # ------------------------------------------------------------------ loop
    def _record(self, step: int, metrics) -> dict:
        """Bring one step's metrics to the host (the loop reads them a step late, so it never
        waits for the step it just launched); stop on a non-finite loss."""
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not math.isfinite(m["loss"]):
            raise self._non_finite(f"loss became {m['loss']}", step)
        self.history.append({"step": step, **m})
        self.window.add(m)
        self._last_loss = m["loss"]
        self._bar.update(step - self._bar.n)
        return m

    def _run_hooks(self, hooks: Sequence[Hook], step: int, final: bool) -> None:
        for hook in hooks:
            with self.window.excluded():
                hook(self, step, final)

    def run(self, until: int | None = None, until_seconds: float | None = None) -> RunResult:
        """Train to max_steps (or stop early at step `until`, or after `until_seconds` of training
        not counting the first, compiling step; a checkpoint is saved where it stops)."""
        cfg = self.cfg
        end = cfg.max_steps if until is None else min(until, cfg.max_steps)
        start = self.step
        self.history.clear()
        self._stop, self._last_loss, self._eval_loss = None, None, None
        if start >= end:
            self.log(f"already at step {start} of max_steps ({cfg.max_steps}) in {cfg.model_path}; nothing to train")
            return RunResult(start, None, None, [])
        hooks = self.hooks + ([TimeLimit(until_seconds)] if until_seconds is not None else [])
        tokens_per_step = cfg.train_batch_size * cfg.n_ctx
        peak, peak_source = peak_flops_per_device(cfg)
        peak *= self.mesh.devices.size
        self.log(f"training {model.count_params(self._state['params']):,} parameters from step {start} "
                 f"to {cfg.max_steps}; {tokens_per_step} tokens/step; MFU against {peak / 1e9:.0f} "
                 f"GFLOP/s ({peak_source}), counting 6N + 12*L*T*D FLOPs per token")
        self._bar = tqdm(total=cfg.max_steps, initial=start, disable=not self.progress, unit="step",
                         dynamic_ncols=True, file=sys.stderr,
                         mininterval=0.5 if sys.stderr.isatty() else 30)  # a log file needs few redraws
        self.window = ThroughputWindow(tokens_per_step, train_flops_per_token(cfg) * tokens_per_step, peak)
        pending = None  # (step, metrics on device) of the step launched before
        step = start
        try:
            hosts_agree = preemption_service()
            refusals = [reason for reason in (hook.start(self) for hook in hooks) if reason]
            if refusals:  # e.g. a time budget counted across restarts that is already used up
                self.log(f"not training: {refusals[0]}")
                end = start
            with stop_on_signals(self.request_stop, hosts_agree=hosts_agree):
                while step < end:
                    batch = self._put(self.train_data.next_batch())
                    self._state, metrics = self.train_step(self._state, batch)
                    step += 1
                    if pending is not None:
                        self._record(*pending)
                    pending = (step, metrics)
                    if step == start + 1:  # the first step includes compilation: keep it out of tokens/s
                        first = self._record(*pending)
                        pending = None
                        self.metrics.write({"step": step, **first, "first_step_s": self.window.elapsed()})
                        self.window.restart()
                    for hook in hooks:
                        reason = hook.wants_stop(self, step)
                        if reason:
                            self.request_stop(reason)
                    if hosts_agree and reached_stop_point(step):  # every host stops at this step together
                        self.request_stop(signal.SIGTERM)
                    final = step == end or self._stop is not None
                    due = [h for h in hooks if h.due(step, final)]
                    if due and pending is not None:
                        self._record(*pending)
                        pending = None
                    self._run_hooks(due, step, final)
                    if not final and self._stop is not None:  # a hook asked to stop: this step is the last
                        self._run_hooks([h for h in hooks if h not in due and h.due(step, True)], step, True)
                        final = True
                    if final:
                        break
                if pending is not None:
                    self._record(*pending)
            if self._stop is not None:
                self.ckpt.wait()
                if self._stop.signal is not None:
                    raise Interrupted(f"stopped by signal {self._stop.signal} at step {step}; checkpoint saved in "
                                      f"{self.ckpt.dir}: rerun the same command to resume")
                self.log(f"stopped at step {step}: {self._stop.reason}; checkpoint saved in {self.ckpt.dir}")
        finally:
            self._bar.close()
            self.ckpt.wait()  # never leave a save half-written behind an exception
            self.metrics.close()
            self.train_data.close()
            if self.eval_data is not None:
                self.eval_data.close()
        return RunResult(step, self._last_loss, self._eval_loss, list(self.history), self.train_data.skipped_records)
