"""The training loop: jitted step, periodic evaluation, metrics, checkpoints, exact resume.

Rerunning the same command resumes from the newest checkpoint in model_path with the
optimizer state, step, RNG and data position restored, so the run continues exactly as if
it had never stopped. The loop never waits on the device for the step it just launched: it
reads the previous step's metrics while the current one runs.
"""

from __future__ import annotations

import collections
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from . import model
from .checkpoint import Checkpointer
from .config import Config
from .errors import UserError
from .inputs import get_input
from .inputs.prefetch import Prefetched
from .mesh import batch_sharding, check_batch, mesh_for, replicated, state_shardings
from .metrics import MetricsWriter, peak_flops_per_device, train_flops_per_token
from .optimizers import learning_rate_schedule, make_optimizer


HISTORY_STEPS = 10_000  # per-step metrics kept in memory; a 500k-step run must not grow without bound


class NonFiniteLoss(UserError):
    pass


def initial_params(cfg: Config) -> model.Params:
    """The parameters a run with this config starts from (step 0)."""
    return model.init_params(cfg, jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 0))


def init_state(cfg: Config, tx: optax.GradientTransformation) -> dict:
    params = initial_params(cfg)
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
            "rng": jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 1)}


def make_train_step(cfg: Config, tx: optax.GradientTransformation):
    """state, batch [B, n_ctx+1] -> new state, metrics. Accumulates grad_accum_steps micro-batches."""
    schedule = learning_rate_schedule(cfg)
    use_dropout = max(cfg.embed_dropout, cfg.attn_dropout, cfg.res_dropout) > 0
    accum = cfg.grad_accum_steps

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
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_state = {"step": state["step"] + 1, "params": optax.apply_updates(params, updates),
                     "opt_state": opt_state, "rng": state["rng"]}
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(state["step"])}
        return new_state, metrics

    return step


def make_eval_step(cfg: Config):
    def eval_step(params, batch):
        return model.token_losses(params, batch, cfg).mean()
    return eval_step


@jax.jit
def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]))


@dataclass
class RunResult:
    step: int
    last_loss: float | None
    eval_loss: float | None
    history: list  # per-step metrics of this call, the last HISTORY_STEPS at most


class Trainer:
    def __init__(self, cfg: Config, tokenizer, *, progress: bool = True, log=print, devices=None):
        if not cfg.model_path:
            raise UserError("model_path is empty: set it in the config to the directory for checkpoints")
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
        self.metrics = MetricsWriter(cfg.model_path, enabled=jax.process_index() == 0)  # one writer per run
        self.ckpt = Checkpointer(cfg)
        self._stop_signal = None

        rep, data = replicated(self.mesh), batch_sharding(self.mesh)
        self._batch_sharding = data
        # Parameters and optimizer state sharded along fsdp (replicated when it is 1).
        state_sh = state_shardings(self.mesh, jax.eval_shape(lambda: init_state(cfg, self.tx)))
        self.state_shardings = state_sh
        self.train_step = jax.jit(make_train_step(cfg, self.tx), in_shardings=(state_sh, data),
                                  out_shardings=(state_sh, rep), donate_argnums=0)
        self.eval_step = jax.jit(make_eval_step(cfg), in_shardings=(state_sh["params"], data), out_shardings=rep)
        try:
            self.state = self._initial_state(state_sh)
        except BaseException:
            self.ckpt.close()  # release Orbax's background threads before the error propagates
            raise

    # ------------------------------------------------------------------ state
    def _initial_state(self, sharding):
        abstract = jax.eval_shape(lambda: init_state(self.cfg, self.tx))
        latest = self.ckpt.latest_step()
        if latest is not None and self.ckpt.read_meta(latest).get("kind") == "pretrained":
            # A converted pretrained model: its weights, a fresh optimizer, step 0.
            self.log(f"starting from the pretrained model in {self.ckpt.dir}")
            return self._state_from_params(self.ckpt.restore_params(latest, sharding["params"]), sharding)
        if latest is not None:
            abstract = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), abstract, sharding)
            state, data_state = self.ckpt.restore(abstract, latest)
            self.train_data.restore(data_state)
            self.log(f"resumed from {self.ckpt.dir} at step {latest}")
            dropped = self.metrics.forget_after(latest)
            if dropped:
                self.log(f"dropped {dropped} metrics records of steps after {latest} (they will be trained again)")
            return state
        if self.cfg.init_from:
            from .pretrained import fit, load_pretrained
            pre = load_pretrained(self.cfg.init_from)
            self.log(f"initialised from the pretrained model {pre.source}")
            return self._state_from_params(fit(pre, self.cfg), sharding)
        return jax.jit(lambda: init_state(self.cfg, self.tx), out_shardings=sharding)()

    def _state_from_params(self, params, sharding):
        def build(p):
            return {"step": jnp.zeros((), jnp.int32), "params": p, "opt_state": self.tx.init(p),
                    "rng": jax.random.fold_in(jax.random.PRNGKey(self.cfg.seed), 1)}
        return jax.jit(build, out_shardings=sharding)(jax.tree.map(jnp.asarray, params))

    @property
    def step(self) -> int:
        return int(self.state["step"])

    def _put(self, batch: np.ndarray):
        if jax.process_count() > 1:  # each host holds its own rows of the global batch
            return jax.make_array_from_process_local_data(self._batch_sharding, batch)
        return jax.device_put(batch, self._batch_sharding)

    # ------------------------------------------------------------------ pieces
    def evaluate(self) -> dict | None:
        if self.eval_data is None:
            return None
        self.eval_data.reset()
        losses = [self.eval_step(self.state["params"], self._put(self.eval_data.next_batch()))
                  for _ in range(self.cfg.eval_steps)]
        loss = float(np.mean(jax.device_get(losses)))
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}

    def save(self) -> None:
        # The last update can overflow after a finite loss was reported: never save such a state.
        if not bool(_all_finite(self.state["params"])):
            good = self.ckpt.latest_step()
            raise NonFiniteLoss(
                f"the parameters became non-finite at step {self.step}; this state was not saved. The last good "
                f"checkpoint is step {good} in {self.ckpt.dir}. Lower lr (now {self.cfg.lr}), raise "
                "warmup_steps, or set grad_clip, then rerun to resume.")
        self.ckpt.save(self.step, self.state, self.train_data.state())

    def _request_stop(self, signum, _frame):
        self._stop_signal = signum

    # ------------------------------------------------------------------ loop
    def run(self, until: int | None = None, until_seconds: float | None = None) -> RunResult:
        """Train to max_steps (or stop early at step `until`, or after `until_seconds` of training
        not counting the first, compiling step; a checkpoint is saved where it stops)."""
        cfg = self.cfg
        end = cfg.max_steps if until is None else min(until, cfg.max_steps)
        start = self.step
        history: collections.deque = collections.deque(maxlen=HISTORY_STEPS)
        if start >= end:
            self.log(f"already at step {start} of max_steps ({cfg.max_steps}) in {cfg.model_path}; nothing to train")
            return RunResult(start, None, None, [])
        tokens_per_step = cfg.train_batch_size * cfg.n_ctx
        flops_per_step = train_flops_per_token(cfg) * tokens_per_step
        peak, peak_source = peak_flops_per_device(cfg)
        peak *= self.mesh.devices.size
        self.log(f"training {model.count_params(self.state['params']):,} parameters from step {start} "
                 f"to {cfg.max_steps}; {tokens_per_step} tokens/step; MFU against {peak / 1e9:.0f} "
                 f"GFLOP/s ({peak_source}), counting 6N + 12*L*T*D FLOPs per token")
        ckpt_every = cfg.checkpoint_every or cfg.train_steps
        # Ctrl-C / SIGTERM finish the current step and save before exiting (signals only reach the main thread).
        old_handlers = {}
        if threading.current_thread() is threading.main_thread():
            old_handlers = {s: signal.signal(s, self._request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        bar = tqdm(total=cfg.max_steps, initial=start, disable=not self.progress, unit="step",
                   dynamic_ncols=True, file=sys.stderr,
                   mininterval=0.5 if sys.stderr.isatty() else 30)  # a log file needs few redraws
        pending = None          # (step, metrics on device) of the step launched before
        window_start = time.perf_counter()
        last_loss, eval_loss = None, None

        def settle(entry):
            """Bring one step's metrics to the host; stop on a non-finite loss."""
            nonlocal last_loss
            step, m = entry
            m = {k: float(v) for k, v in jax.device_get(m).items()}
            if not math.isfinite(m["loss"]):
                good = self.ckpt.latest_step()
                raise NonFiniteLoss(
                    f"loss became {m['loss']} at step {step}; training stopped without saving this state. "
                    f"The last good checkpoint is step {good} in {self.ckpt.dir}. Lower lr "
                    f"(now {cfg.lr}), raise warmup_steps, or set grad_clip, then rerun to resume.")
            last_loss = m["loss"]
            return step, m

        def record(step, m):
            history.append({"step": step, **m})
            window.append(m)
            bar.update(step - bar.n)

        def log_window(step):
            nonlocal window, window_start
            if not window:
                return
            elapsed = time.perf_counter() - window_start
            tok_s = len(window) * tokens_per_step / elapsed
            line = {"step": step, "loss": float(np.mean([m["loss"] for m in window])),
                    "lr": window[-1]["lr"], "grad_norm": float(np.mean([m["grad_norm"] for m in window])),
                    "tokens_per_s": tok_s, "mfu": tok_s / tokens_per_step * flops_per_step / peak,
                    "time": time.time()}
            line["ppl"] = math.exp(min(line["loss"], 50.0))
            self.metrics.write(line)
            bar.set_postfix(loss=f"{line['loss']:.3f}", ppl=f"{line['ppl']:.1f}", lr=f"{line['lr']:.2e}",
                            gnorm=f"{line['grad_norm']:.2f}", tok_s=f"{tok_s:.0f}", mfu=f"{line['mfu']:.1%}")
            if not self.progress:
                self.log(f"step {step}: loss {line['loss']:.4f} ppl {line['ppl']:.2f} lr {line['lr']:.2e} "
                         f"grad_norm {line['grad_norm']:.3f} {tok_s:.0f} tokens/s MFU {line['mfu']:.1%}")
            window, window_start = [], time.perf_counter()

        step = start
        window: list = []
        deadline = None
        try:
            while step < end:
                batch = self._put(self.train_data.next_batch())
                self.state, metrics = self.train_step(self.state, batch)
                step += 1
                if pending is not None:
                    record(*settle(pending))
                pending = (step, metrics)
                if step == start + 1:  # the first step includes compilation: keep it out of tokens/s
                    _, first = settle(pending)
                    record(step, first)
                    pending = None
                    compile_s = time.perf_counter() - window_start
                    self.metrics.write({"step": step, **first, "first_step_s": compile_s})
                    window, window_start = [], time.perf_counter()
                    if until_seconds is not None:
                        deadline = window_start + until_seconds
                out_of_time = deadline is not None and time.perf_counter() >= deadline
                is_end = step == end or self._stop_signal is not None or out_of_time
                do_eval = self.eval_data is not None and (step % cfg.train_steps == 0 or is_end)
                do_save = step % ckpt_every == 0 or is_end
                if step % cfg.iterations == 0 or do_eval or do_save or is_end:
                    if pending is not None:
                        record(*settle(pending))
                        pending = None
                    log_window(step)
                if do_eval:
                    ev = self.evaluate()
                    eval_loss = ev["eval_loss"]
                    self.metrics.write({"step": step, **ev})
                    history[-1].update(ev)
                    self.log(f"step {step}: eval loss {ev['eval_loss']:.4f} perplexity {ev['eval_ppl']:.2f}")
                if do_save:
                    self.save()
                if do_eval or do_save:
                    window_start = time.perf_counter()
                if self._stop_signal is not None:
                    self.ckpt.wait()
                    raise Interrupted(f"stopped by signal {self._stop_signal} at step {step}; "
                                      f"checkpoint saved in {self.ckpt.dir}: rerun the same command to resume")
                if out_of_time:
                    break
            if pending is not None:
                record(*settle(pending))
        finally:
            bar.close()
            self.ckpt.wait()  # never leave a save half-written behind an exception
            self.metrics.close()
            self.train_data.close()
            if self.eval_data is not None:
                self.eval_data.close()
            for s, h in old_handlers.items():
                signal.signal(s, h)
        return RunResult(step, last_loss, eval_loss, list(history))


class Interrupted(UserError):
    """A clean stop on SIGINT/SIGTERM after saving; exits non-zero so scripts notice."""
