"""Optax optimizers by name: a registry of builders, each with the config keys it reads.

`opt_name` picks one; a new optimizer is one `@register_optimizer` function here (the config's
validation, `python -m gpt2train keys` and docs/options.md read the registry). Gradients are
clipped to global norm `grad_clip` before any of them.

Weight decay (decoupled, scaled by the learning rate as in AdamW) applies to matrices only:
the token and position embeddings and every `kernel`. Biases and LayerNorm scales/biases
are never decayed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import optax

# Builders take the run's config (config.Config; not imported here, since the config's
# validation reads this registry) and the learning-rate schedule.
Builder = Callable[..., optax.GradientTransformation]


@dataclass(frozen=True)
class Optimizer:
    name: str
    build: Builder
    keys: tuple[str, ...]  # the config keys it reads besides lr and the schedule's
    doc: str


OPTIMIZERS: dict[str, Optimizer] = {}


def register_optimizer(name: str, keys: tuple[str, ...], doc: str) -> Callable[[Builder], Builder]:
    def register(build: Builder) -> Builder:
        if name in OPTIMIZERS:
            raise ValueError(f"optimizer {name!r} is already registered")
        OPTIMIZERS[name] = Optimizer(name, build, keys, doc)
        return build
    return register


def learning_rate_schedule(cfg) -> optax.Schedule:
    """Linear warmup from 0 to lr over warmup_steps, then cosine decay to lr*min_lr_ratio at max_steps."""
    decay_steps = max(cfg.max_steps, cfg.warmup_steps + 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=cfg.warmup_steps,
        decay_steps=decay_steps, end_value=cfg.lr * cfg.min_lr_ratio)


def decay_mask(params):
    """True for parameters that get weight decay: embeddings and matmul kernels."""
    def is_matrix(path, _):
        last = path[-1].key if hasattr(path[-1], "key") else str(path[-1])
        return last in ("kernel", "wte", "wpe")
    return jax.tree_util.tree_map_with_path(is_matrix, params)


@register_optimizer("adam", ("beta1", "beta2", "epsilon", "weight_decay"),
                    "Adam; with weight_decay > 0 it is AdamW (decoupled decay on matrices), as the seed's was")
def _adam(cfg, schedule):
    if cfg.weight_decay > 0:
        return _adamw(cfg, schedule)
    return optax.adam(schedule, b1=cfg.beta1, b2=cfg.beta2, eps=cfg.epsilon)


@register_optimizer("adamw", ("beta1", "beta2", "epsilon", "weight_decay"),
                    "AdamW: Adam with decoupled weight decay on matrices")
def _adamw(cfg, schedule):
    return optax.adamw(schedule, b1=cfg.beta1, b2=cfg.beta2, eps=cfg.epsilon,
                       weight_decay=cfg.weight_decay, mask=decay_mask)


def _adam_style_decay(step, beta2):
    """Adafactor's 'adam' second-moment decay: equivalent to Adam's bias-corrected beta2."""
    return beta2 * (1.0 - beta2 ** step) / (1.0 - beta2 ** (step + 1.0))


def _pow_decay(step, exponent):
    return 1.0 - (step + 1.0) ** (-exponent)


@register_optimizer("adafactor", ("decay_type", "decay_exponent", "beta2", "beta1", "weight_decay"),
                    "Adafactor: factored second moments (decay_type pow: 1 - (step+1)^-decay_exponent; adam: "
                    "Adam's bias-corrected beta2), update clipping at RMS 1, momentum when beta1 > 0")
def _adafactor(cfg, schedule):
    if cfg.decay_type == "adam":
        rms = optax.scale_by_factored_rms(decay_rate=cfg.beta2, decay_rate_fn=_adam_style_decay)
    else:
        rms = optax.scale_by_factored_rms(decay_rate=cfg.decay_exponent, decay_rate_fn=_pow_decay)
    parts = [rms, optax.clip_by_block_rms(1.0)]
    if cfg.beta1 > 0:
        parts.append(optax.ema(cfg.beta1, debias=False))
    if cfg.weight_decay > 0:
        parts.append(optax.add_decayed_weights(cfg.weight_decay, decay_mask))
    parts.append(optax.scale_by_learning_rate(schedule))
    return optax.chain(*parts)


def make_optimizer(cfg) -> optax.GradientTransformation:
    """The config's optimizer (opt_name), after clipping to global norm grad_clip (0: no clipping)."""
    opt = OPTIMIZERS[cfg.opt_name].build(cfg, learning_rate_schedule(cfg))
    if cfg.grad_clip > 0:
        opt = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), opt)
    return opt
