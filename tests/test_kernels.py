"""The `kernels` switch: the XLA:CPU kernels and the standard ones compute the same function.

Tolerances. float32: 1e-5 of the compared array's largest magnitude. bfloat16 keeps 8
significant bits, so one rounding moves a value by at most 2^-8 of it; where the two
implementations round at different places (the cpu kernels round cotangents and attention's
score gradients to bfloat16, autodiff keeps some of them in float32), their results may differ
by a few such roundings, counted per comparison below, of the result's scale. Every input and
weight is random with a spread (std ~0.3 to 1) so that a wrong kernel cannot hide in a
near-uniform softmax or near-zero gradients.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt2train import kernels as K
from gpt2train import model as M
from gpt2train.config import KERNELS, Config
from gpt2train.errors import UserError

BF16_ROUNDING = 2.0 ** -8  # the largest relative change one rounding to bfloat16 makes
F32_TOL = 1e-5


def assert_close(actual, expected, dtype, roundings, scale=None):
    """|actual - expected| <= tolerance x scale, elementwise; scale defaults to max |expected|.
    The tolerance is F32_TOL in float32 and `roundings` bfloat16 roundings in bfloat16."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    scale = np.max(np.abs(expected)) if scale is None else np.asarray(scale, np.float64)
    tol = (F32_TOL if dtype == jnp.float32 else roundings * BF16_ROUNDING) * scale
    excess = np.abs(actual - expected) - tol
    worst = np.max(np.abs(actual - expected) / np.maximum(scale, 1e-30))
    assert np.all(excess <= 0), f"off by up to {worst:.3g} of the scale"


def test_auto_is_cpu_on_this_cpu_and_every_config_value_resolves():
    assert jax.default_backend() == "cpu"
    assert Config().kernels == "auto" and K.resolve("auto") == "cpu"
    assert {K.resolve(name) for name in KERNELS} == set(K.IMPLS) == {"cpu", "standard"}
    with pytest.raises(ValueError, match="'gpu'"):
        K.resolve("gpu")


def test_unknown_kernels_value_is_a_config_error_naming_the_key():
    with pytest.raises(UserError) as e:
        Config().replace(kernels="fast")
    assert "kernels must be one of" in str(e.value) and "'fast'" in str(e.value)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_attention_values_and_gradients_agree(dtype):
    # T = 150: the cpu kernel's blocks of 128 query rows leave a ragged second block.
    k_qkv, k_r = jax.random.split(jax.random.PRNGKey(0))
    qkv = jax.random.normal(k_qkv, (2, 150, 3, 3, 16)).astype(dtype)
    r = jax.random.normal(k_r, (2, 150, 3, 16))  # a random cotangent
    out, grad = {}, {}
    for impl in K.IMPLS:
        out[impl] = K.causal_attention(qkv, impl)
        grad[impl] = jax.grad(lambda qkv: jnp.sum(K.causal_attention(qkv, impl).astype(jnp.float32) * r))(qkv)
    assert out["cpu"].shape == (2, 150, 3, 16) and out["cpu"].dtype == out["standard"].dtype == dtype
    # Output: each rounds its float32 result to bfloat16 once, the probabilities once.
    assert_close(out["cpu"], out["standard"], dtype, roundings=2)
    # Gradient: the cotangent, probabilities, score gradient and result each rounded once more or less.
    assert_close(grad["cpu"], grad["standard"], dtype, roundings=4)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_attention_row_by_row_equals_the_whole_batch(dtype, monkeypatch):
    """Without a gradient, a batch with large scores goes one row at a time (ROW_BY_ROW_SCORE_BYTES):
    the same numbers as the whole batch at once and as the gradient's forward, but for the last
    bit of a product's rounding (the products' batch shapes differ)."""
    qkv = jax.random.normal(jax.random.PRNGKey(0), (3, 150, 3, 3, 16)).astype(dtype)
    whole = jax.jit(lambda q: K.causal_attention(q, "cpu"))(qkv)
    monkeypatch.setattr(K, "ROW_BY_ROW_SCORE_BYTES", 0)
    jaxpr = str(jax.make_jaxpr(lambda q: K.causal_attention(q, "cpu"))(qkv))
    assert "while" in jaxpr or "scan" in jaxpr  # the rows are a loop
    by_row = jax.jit(lambda q: K.causal_attention(q, "cpu"))(qkv)
    assert_close(by_row, whole, dtype, roundings=1)
    forward_of_gradient, _ = jax.vjp(lambda q: K.causal_attention(q, "cpu"), qkv)
    assert_close(by_row, forward_of_gradient, dtype, roundings=1)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("transposed", [False, True])  # [in, out] layers; the tied head's [V, D]
@pytest.mark.parametrize("rows", [16, 15])  # an odd row count takes the float32 weight-gradient path
def test_matmul_values_and_gradients_agree(dtype, transposed, rows):
    kx, kw, kg = jax.random.split(jax.random.PRNGKey(1), 3)
    x = jax.random.normal(kx, (rows, 48)).astype(dtype)
    w = 0.3 * jax.random.normal(kw, (40, 48) if transposed else (48, 40))
    g = jax.random.normal(kg, (rows, 40))
    res = {}
    for impl in K.IMPLS:
        y, vjp = jax.vjp(lambda x, w: K.matmul(x, w, transposed=transposed, impl=impl), x, w)
        res[impl] = (y, *vjp(g))
    (y, dx, dw), (y_ref, dx_ref, dw_ref) = res["cpu"], res["standard"]
    assert y.dtype == y_ref.dtype == jnp.float32 and dx.dtype == dx_ref.dtype == dtype
    assert dw.dtype == dw_ref.dtype == jnp.float32
    # Each product's error is bounded by the sum of its terms' magnitudes, |a| @ |b|.
    wk = np.abs(np.asarray(w).T if transposed else np.asarray(w))  # [in, out]
    xa, ga = np.abs(np.asarray(x, np.float32)), np.abs(np.asarray(g))
    assert_close(y, y_ref, dtype, roundings=1, scale=xa @ wk)  # w rounded to x's dtype in both
    assert_close(dx, dx_ref, dtype, roundings=3, scale=ga @ wk.T)  # cotangent, weight, result
    dw_scale = xa.T @ ga if not transposed else ga.T @ xa
    assert_close(dw, dw_ref, dtype, roundings=2, scale=dw_scale)  # the cotangent; sums in another order


def _spread_params(cfg):
    """init_params with every leaf moved by N(0, 0.3): no uniform LayerNorms, zero biases or tiny weights."""
    params = M.init_params(cfg, jax.random.PRNGKey(0))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(5), len(leaves))
    return jax.tree.unflatten(tree, [a + 0.3 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_model_loss_and_gradients_agree(precision):
    cfg = Config(n_ctx=256, n_embd=64, n_layer=2, n_head=4, n_vocab=300, embed_dropout=0.0, attn_dropout=0.0,
                 res_dropout=0.0, precision=precision).validate()
    params = _spread_params(cfg)
    batch = jax.random.randint(jax.random.PRNGKey(1), (2, 151), 0, cfg.n_vocab)  # 150 positions: two blocks
    res = {}
    for impl in K.IMPLS:
        c = cfg.replace(kernels=impl)
        res[impl] = jax.jit(jax.value_and_grad(lambda p: M.token_losses(p, batch, c).mean()))(params)
    (loss, grads), (loss_ref, grads_ref) = res["cpu"], res["standard"]
    dtype = M.compute_dtype(cfg)
    # Each of the 2 layers' attention and products rounds a few values differently (as above, ~4),
    # and a layer's differences travel through the layers after it: 4 roundings a layer.
    assert_close(loss, loss_ref, dtype, roundings=8)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads_ref)):
        assert a.dtype == b.dtype == jnp.float32, jax.tree_util.keystr(path)
        assert_close(a, b, dtype, roundings=8)


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_each_setting_reaches_its_kernels(precision):
    """The model passes cfg.kernels down: the cpu kernels carry their own gradients (custom VJPs)
    and the standard ones none, so a model that ignored the setting would fail here."""
    cfg = Config(n_ctx=32, n_embd=32, n_layer=1, n_head=2, n_vocab=100, precision=precision).validate()
    params = M.init_params(cfg, jax.random.PRNGKey(0))
    batch = jnp.zeros((1, 9), jnp.int32)
    custom = {impl: str(jax.make_jaxpr(lambda p, c=cfg.replace(kernels=impl): M.token_losses(p, batch, c))(params))
              .count("custom_vjp_call") for impl in KERNELS}
    # float32: attention (the products are plain) and, on one CPU device with AVX-512, the head's
    # cross-entropy (kernels.native_cross_entropy); bfloat16: attention and the five products.
    float32 = 1 + K.native_on_one_device()
    assert custom == {"auto": custom["cpu"], "cpu": float32 if precision == "float32" else 6, "standard": 0}


# ----------------------------------------------------------------------------- the compiled bf16 step
def compiled_products(hlo: str) -> list[tuple[tuple[str, ...], str]]:
    """(operand element types, JAX op name) of every dot and convolution in optimized HLO text.
    Instruction names are unique in a module, so each operand's type is where it is defined."""
    defined = dict(re.findall(r"^\s*(?:ROOT )?%(\S+) = (\w+)\[", hlo, re.M))
    found = []
    for operands, attributes in re.findall(r"^\s*(?:ROOT )?%\S+ = \w+\[[^=]*? (?:dot|convolution)\(([^)]*)\)(.*)$",
                                           hlo, re.M):
        names = re.findall(r"%([\w.-]+)", operands)
        op_name = re.search(r'op_name="([^"]*)"', attributes)
        found.append((tuple(defined[n] for n in names), op_name.group(1) if op_name else ""))
    return found


def bf16_train_step_hlo(n_ctx: int) -> str:
    from gpt2train.optimizers import make_optimizer
    from gpt2train.train import init_state, make_train_step
    cfg = Config(n_ctx=n_ctx, n_embd=64, n_layer=1, n_head=4, n_vocab=300, train_batch_size=2, precision="bfloat16",
                 embed_dropout=0.0, attn_dropout=0.0, res_dropout=0.0).validate()
    tx = make_optimizer(cfg)
    state = jax.eval_shape(lambda: init_state(cfg, tx))
    batch = jax.ShapeDtypeStruct((2, n_ctx + 1), jnp.int32)
    return jax.jit(make_train_step(cfg, tx)).lower(state, batch).compile().as_text()


# The one product XLA:CPU (JAX 0.10.2) may run in float32: attention's backward dp = g v^T when
# the context is a single block of query rows (n_ctx <= kernels.ATTN_BLOCK). XLA fuses it with
# the softmax's backward into one YNNPACK fusion and converts both of its bfloat16 operands to
# float32 there (the cotangent is rounded to bfloat16 first, so the numbers are bf16's; the
# product runs at float32 speed). With two or more blocks (the 124M shapes of bench/: n_ctx 256
# and 1024) every product stays in bfloat16, as the compiled 124M step shows too.
def is_single_block_dp(op_name: str) -> bool:
    # The einsum's name sits inside jvp(...) where the layers are unrolled from a list (train.layered)
    # and after it where they are scanned.
    return (op_name.startswith("jit(step)/transpose(jvp(") and "bhqd,bhkd->bhqk" in op_name
            and op_name.endswith("/dot_general"))


@pytest.mark.parametrize("n_ctx", [2 * K.ATTN_BLOCK, 32])
def test_every_product_of_the_compiled_bf16_train_step_is_bf16(n_ctx):
    hlo = bf16_train_step_hlo(n_ctx)
    products = compiled_products(hlo)
    # Where the layers' and the head's products run on our kernels (native_dense_training: CPUs
    # with AMX), each forward call is one product and each backward call two, all in bfloat16 (the
    # head's backward starts from the logits its forward kept: kernels.KEPT_LOGITS_BYTES).
    calls = lambda target: hlo.count(f'custom_call_target="{target}"')  # noqa: E731
    ours = (calls("gpt2train_dense") + calls("gpt2train_dense_gelu") + calls("gpt2train_head_losses_kept")
            + 2 * (calls("gpt2train_dense_backward") + calls("gpt2train_head_grads")))
    assert ours == (15 if K.scoring_tiles() and K._scoring_kernels_usable() else 0)
    # 1 layer: 4 products forward, 8 backward; the head's 3; attention 2 + 4 per block (its head
    # size, 16, is one our attention kernels do not take: XLA's attention is what this test holds)
    assert len(products) + ours >= 15 + 6 * (n_ctx // K.ATTN_BLOCK or 1)
    float32 = [(types, name) for types, name in products if set(types) != {"bf16"}]
    if n_ctx > K.ATTN_BLOCK:
        assert float32 == []
    else:
        assert float32 and all(is_single_block_dp(name) for _, name in float32), float32
