"""Optax optimizer chains built from the config's keys.

Weight decay (decoupled, scaled by the learning rate as in AdamW) applies to matrices only:
the token and position embeddings and every `kernel`. Biases and LayerNorm scales/biases
are never decayed.
"""

from __future__ import annotations

import jax
import optax

from .config import Config


def learning_rate_schedule(cfg: Config) -> optax.Schedule:
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


def _adam_style_decay(step, beta2):
    """Adafactor's 'adam' second-moment decay: equivalent to Adam's bias-corrected beta2."""
    return beta2 * (1.0 - beta2 ** step) / (1.0 - beta2 ** (step + 1.0))


def _pow_decay(step, exponent):
    return 1.0 - (step + 1.0) ** (-exponent)


def _adafactor(cfg: Config, schedule) -> optax.GradientTransformation:
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


def make_optimizer(cfg: Config) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(cfg)
    if cfg.opt_name == "adafactor":
        opt = _adafactor(cfg, schedule)
    elif cfg.weight_decay > 0 or cfg.opt_name == "adamw":
        opt = optax.adamw(schedule, b1=cfg.beta1, b2=cfg.beta2, eps=cfg.epsilon,
                          weight_decay=cfg.weight_decay, mask=decay_mask)
    else:
        opt = optax.adam(schedule, b1=cfg.beta1, b2=cfg.beta2, eps=cfg.epsilon)
    if cfg.grad_clip > 0:
        opt = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), opt)
    return opt
