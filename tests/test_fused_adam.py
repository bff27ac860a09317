"""fused_adam: the train step's Adam on CPU (native_kernel.adam_update) gives what optax's chain
gives, value for value and state for state, and the step uses it exactly where it should."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gpt2train import fused_adam, model, native_kernel
from gpt2train import kernels as K
from gpt2train.config import Config
from gpt2train.optimizers import make_optimizer
from gpt2train.train import init_state, make_train_step

pytestmark = pytest.mark.skipif(not ({"avx512f", "avx512bw"} <= K.cpu_flags() and native_kernel.available()),
                                reason="this CPU has no AVX-512 (or no compiler): the fused step is never used here")

SMALL = dict(n_layer=2, n_embd=64, n_head=2, n_vocab=300, n_ctx=16)


def optax_step(tx):
    def step(grads, opt_state, params):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state
    return jax.jit(step)


def fused_step(cfg):
    return jax.jit(lambda grads, opt_state, params: fused_adam.apply(cfg, grads, opt_state, params,
                                                                     optax.tree.norm(grads)))


@pytest.mark.parametrize("keys", [
    dict(opt_name="adam", weight_decay=0.01, grad_clip=1.0),  # the default: adamw on matrices, clipped
    dict(opt_name="adam", weight_decay=0.0, grad_clip=0.0),  # optax.adam, no clip
    dict(opt_name="adamw", weight_decay=0.1, grad_clip=0.5, beta2=0.95, epsilon=1e-8)])
@pytest.mark.parametrize("scale", [1e-3, 3.0])  # the global norm under and over grad_clip
def test_fused_steps_equal_optax(keys, scale):
    cfg = Config(**SMALL, lr=1e-2, warmup_steps=2, max_steps=10, **keys).validate()
    assert fused_adam.usable(cfg)
    tx = make_optimizer(cfg)
    params = model.init_params(cfg, jax.random.key(0))
    ours, theirs = (params, tx.init(params)), (params, tx.init(params))
    rng = np.random.default_rng(1)
    for _ in range(4):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape) * scale, jnp.float32), params)
        theirs = optax_step(tx)(grads, theirs[1], theirs[0])
        ours = fused_step(cfg)(grads, ours[1], ours[0])
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), theirs[0], params)
    assert min(jax.tree.leaves(moved)) > 1e-4  # the steps did move every parameter
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):  # float32 rounding, in another order
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(np.abs(b).max()))


@pytest.mark.parametrize("n", [1, 37, 100_003])  # a masked tail, and several chunks across threads
def test_the_kernel_is_adams_formula_in_place(n):
    rng = np.random.default_rng(n)
    g, m, p = (rng.standard_normal(n).astype(np.float32) for _ in range(3))
    v = rng.random(n).astype(np.float32)
    divisor, lr, bc1, bc2 = np.float32(2.0), np.float32(1e-2), np.float32(0.19), np.float32(0.0396)
    scalars = jnp.asarray([divisor, -lr, bc1, bc2], jnp.float32)
    step = jax.jit(lambda *a: native_kernel.adam_update(*a, scalars, b1=0.9, b2=0.98, eps=1e-9, decay=0.1),
                   donate_argnums=(1, 2, 3))
    new_m, new_v, new_p = step(jnp.asarray(g), jnp.asarray(m), jnp.asarray(v), jnp.asarray(p))
    gd = g.astype(np.float64) / divisor
    want_m = 0.1 * gd + 0.9 * m
    want_v = 0.02 * gd * gd + 0.98 * v
    want_p = p - lr * ((want_m / bc1) / (np.sqrt(want_v / bc2) + 1e-9) + 0.1 * p)
    for got, want in ((new_m, want_m), (new_v, want_v), (new_p, want_p)):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def compiled_step(cfg):
    tx = make_optimizer(cfg)
    state = jax.eval_shape(lambda: init_state(cfg, tx))
    batch = jax.ShapeDtypeStruct((2, cfg.n_ctx + 1), jnp.int32)
    return jax.jit(make_train_step(cfg, tx)).lower(state, batch).compile().as_text()


def test_the_train_step_takes_the_fused_step_where_usable():
    cfg = Config(**SMALL, train_batch_size=2).validate()
    assert native_kernel.ADAM_TARGET in compiled_step(cfg)
    assert native_kernel.ADAM_TARGET not in compiled_step(cfg.replace(kernels="standard"))
    assert native_kernel.ADAM_TARGET not in compiled_step(cfg.replace(opt_name="adafactor"))


def test_a_fused_train_step_learns_like_optaxs():
    """Two runs of ten steps from one start, the fused Adam against optax's (monkeypatched off):
    the same losses to float32 rounding."""
    cfg = Config(**SMALL, train_batch_size=2, lr=3e-3, warmup_steps=0, embed_dropout=0.0, attn_dropout=0.0,
                 res_dropout=0.0).validate()
    batch = jnp.asarray(np.random.default_rng(0).integers(0, cfg.n_vocab, (2, cfg.n_ctx + 1)), jnp.int32)

    def losses(fused: bool):
        tx = make_optimizer(cfg)
        real = fused_adam.usable
        fused_adam.usable = real if fused else (lambda cfg: False)
        try:
            step = jax.jit(make_train_step(cfg, tx))
        finally:
            fused_adam.usable = real
        state, out = init_state(cfg, tx), []
        for _ in range(10):
            state, metrics = step(state, batch)
            out.append(float(metrics["loss"]))
        return np.array(out)

    ours, theirs = losses(True), losses(False)
    assert theirs[-1] < theirs[0] - 0.5  # it learns the batch
    np.testing.assert_allclose(ours, theirs, rtol=1e-4)
