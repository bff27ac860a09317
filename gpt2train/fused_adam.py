"""Adam's step in one pass over memory on CPU, giving what optax gives, state for state.

The `adam` and `adamw` optimizers (optimizers.py) are optax chains: clip_by_global_norm,
scale_by_adam, masked add_decayed_weights, scale_by_learning_rate, then optax.apply_updates.
XLA:CPU runs them as one loop per output, each reading the gradient again (~100 ms of a 1,350 ms
124M bfloat16 step on 2 cores of an AMD EPYC, Zen 5); native_kernel.adam_update reads g, m, v and
p once and writes m, v and p in place (72 ms for 124M parameters alone). The state keeps optax's structure, so checkpoints, resume and
`kernels: standard` (which runs optax itself) see no difference; tests/test_fused_adam.py holds the
two to the same values.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from . import kernels, native_kernel
from .optimizers import decay_mask, learning_rate_schedule

_STATES = (optax.ScaleByAdamState, optax.ScaleByScheduleState)


def usable(cfg) -> bool:
    """Whether the train step takes its Adam step here: adam or adamw, `kernels` cpu, one CPU
    device with AVX-512 (the kernel has no sharding rule: on a mesh XLA would gather every
    sharded parameter onto each device), and the native library built."""
    return (cfg.opt_name in ("adam", "adamw") and kernels.resolve(cfg.kernels) == "cpu"
            and kernels.native_on_one_device())


def _states(opt_state):
    """The state's one ScaleByAdamState and one ScaleByScheduleState, or None if it has other counts."""
    found = [optax.tree_utils.tree_get_all_with_path(opt_state, kind.__name__) for kind in _STATES]
    return None if any(len(f) != 1 for f in found) else tuple(f[0][1] for f in found)


def matches(opt_state) -> bool:
    """Whether opt_state is shaped as the adam and adamw chains' (make_optimizer's) are."""
    return _states(opt_state) is not None


def _increment(count):
    """optax's safe increment of an int32 step count: saturates instead of wrapping."""
    return jnp.where(count < jnp.iinfo(count.dtype).max, count + 1, count)


def apply(cfg, grads, opt_state, params, grad_norm):
    """(new params, new opt_state): what make_optimizer(cfg).update followed by
    optax.apply_updates gives, for float32 params; grad_norm is optax.tree.norm(grads)."""
    states = _states(opt_state)
    if states is None:
        raise ValueError("fused_adam: the optimizer state is not the adam or adamw chain's")
    adam, schedule_state = states
    count = _increment(adam.count)
    divisor = jnp.ones((), jnp.float32)
    if cfg.grad_clip > 0:  # clip_by_global_norm: g, or g / (norm / grad_clip) past the limit
        divisor = jnp.where(grad_norm < cfg.grad_clip, divisor, grad_norm / cfg.grad_clip)
    scalars = jnp.stack([divisor, -learning_rate_schedule(cfg)(schedule_state.count),
                         1 - cfg.beta1 ** count, 1 - cfg.beta2 ** count]).astype(jnp.float32)
    decayed = decay_mask(params) if cfg.weight_decay > 0 else jax.tree.map(lambda _: False, params)

    def step(g, m, v, p, decay):
        if p.dtype != jnp.float32:
            raise ValueError(f"fused_adam: parameters are float32, not {p.dtype}")
        return native_kernel.adam_update(g, m, v, p, scalars, b1=cfg.beta1, b2=cfg.beta2, eps=cfg.epsilon,
                                         decay=cfg.weight_decay if decay else 0.0)

    leaves, tree = jax.tree.flatten(params)
    stepped = [step(*args) for args in zip(tree.flatten_up_to(grads), tree.flatten_up_to(adam.mu),
                                           tree.flatten_up_to(adam.nu), leaves, tree.flatten_up_to(decayed))]
    mu, nu, new_params = (tree.unflatten(column) for column in zip(*stepped))

    def replace(state):
        if isinstance(state, optax.ScaleByAdamState):
            return state._replace(count=count, mu=mu, nu=nu)
        if isinstance(state, optax.ScaleByScheduleState):
            return state._replace(count=_increment(state.count))
        return state

    return new_params, jax.tree.map(replace, opt_state, is_leaf=lambda s: isinstance(s, _STATES))
