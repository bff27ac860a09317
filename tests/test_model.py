import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt2train import kernels as K
from gpt2train import model as M
from gpt2train.config import Config


def cfg_(**kw):
    base = dict(n_ctx=32, n_embd=64, n_layer=3, n_head=4, n_vocab=300, embed_dropout=0.0,
                attn_dropout=0.0, res_dropout=0.0)
    return Config(**{**base, **kw}).validate()


@pytest.fixture(scope="module")
def setup():
    cfg = cfg_()
    params = jax.jit(lambda: M.init_params(cfg, jax.random.PRNGKey(0)))()
    toks = jax.random.randint(jax.random.PRNGKey(1), (3, 20), 0, cfg.n_vocab)
    return cfg, params, toks


def test_init_statistics_and_shapes():
    cfg = cfg_(n_layer=8, n_embd=128, n_vocab=1000)
    p = M.init_params(cfg, jax.random.PRNGKey(0))
    assert p["wte"].shape == (1024, 128) and p["h"]["attn"]["c_attn"]["kernel"].shape == (8, 128, 384)
    assert np.all(np.asarray(p["wte"][1000:]) == 0)  # padded rows inert
    assert abs(float(p["h"]["mlp"]["c_fc"]["kernel"].std()) - 0.02) < 1e-3
    assert abs(float(p["h"]["mlp"]["c_proj"]["kernel"].std()) - 0.02 / np.sqrt(16)) < 1e-3  # scale_by_depth
    p2 = M.init_params(cfg_(n_layer=8, n_embd=128, n_vocab=1000, scale_by_in=True, scale_by_depth=False),
                       jax.random.PRNGKey(0))
    assert abs(float(p2["h"]["mlp"]["c_proj"]["kernel"].std()) - 1 / np.sqrt(512)) < 2e-3
    assert M.count_params(p) == sum(x.size for x in jax.tree.leaves(p))


def test_output_does_not_depend_on_future_tokens(setup):
    cfg, params, toks = setup
    base = M.forward(params, toks, cfg)
    changed = toks.at[:, 12:].set((toks[:, 12:] + 7) % cfg.n_vocab)
    other = M.forward(params, changed, cfg)
    np.testing.assert_allclose(base[:, :12], other[:, :12], atol=1e-5)
    assert not np.allclose(base[:, 12:], other[:, 12:], atol=1e-3)  # and the future does change


def test_padded_logits_are_masked(setup):
    cfg, params, toks = setup
    logits = M.forward(params, toks, cfg)
    assert logits.shape[-1] == cfg.padded_vocab > cfg.n_vocab
    probs = jax.nn.softmax(logits, -1)
    assert float(probs[..., cfg.n_vocab:].max()) == 0.0


@pytest.mark.parametrize("precision, tol", [("float32", 2e-5), ("bfloat16", 0.1)])
def test_kv_cache_decoding_matches_full_forward(precision, tol):
    cfg = cfg_(precision=precision)
    params = M.init_params(cfg, jax.random.PRNGKey(0))
    toks = jax.random.randint(jax.random.PRNGKey(1), (2, 20), 0, cfg.n_vocab)
    full = M.forward(params, toks, cfg)
    cache = M.init_cache(cfg, 2, 24)
    pad = jnp.zeros(2, jnp.int32)
    step_logits = []
    dec = M.decode_params(params)
    logits, cache = M.forward_cached(dec, toks[:, :8], cache, 0, pad, cfg)  # prefill 8
    step_logits.append(logits)
    for t in range(8, 20):                                                    # then one at a time
        logits, cache = M.forward_cached(dec, toks[:, t:t + 1], cache, t, pad, cfg)
        step_logits.append(logits)
    decoded = jnp.concatenate(step_logits, axis=1)
    v = cfg.n_vocab
    np.testing.assert_allclose(decoded[..., :v], full[..., :v], atol=tol, rtol=tol)


@pytest.mark.parametrize("per_row_index", [False, True])
def test_bf16_decode_step_updates_its_caches_in_place(per_row_index):
    """A bfloat16 cache must be written where it lies: XLA:CPU converts a bfloat16 array it
    updates to float32 and back, a copy of the whole cache at every token, so the cache is held
    as its bits (uint16). The compiled step writes no float32 (or bfloat16) array of a cache's
    shape, and it decodes as the full forward does."""
    cfg = cfg_(precision="bfloat16")
    trained = M.init_params(cfg, jax.random.PRNGKey(0))
    params = M.decode_params(trained)
    toks = jax.random.randint(jax.random.PRNGKey(1), (2, 9), 0, cfg.n_vocab)
    cache, pad = M.init_cache(cfg, 2, 24), jnp.zeros(2, jnp.int32)
    assert cache["k"][0].dtype == jnp.uint16
    index = jnp.array([8, 8]) if per_row_index else 8
    step = jax.jit(lambda c, t: M.forward_cached(params, t, c, index, pad, cfg), donate_argnums=0)
    hlo = step.lower(cache, toks[:, 8:]).compile().as_text()
    B_H, S, Dh = cache["k"][0].shape
    writes = [line for line in hlo.splitlines() if "dynamic-update-slice(" in line or "scatter(" in line]
    assert writes and not [w for w in writes if f"= f32[{B_H},{S},{Dh}]" in w or f"= bf16[{B_H},{S},{Dh}]" in w]
    _, cache = M.forward_cached(params, toks[:, :8], cache, 0, pad, cfg)
    logits, cache = step(cache, toks[:, 8:])
    full = M.forward(trained, toks, cfg)
    np.testing.assert_allclose(logits[:, 0, :cfg.n_vocab], full[:, 8, :cfg.n_vocab], atol=0.1, rtol=0.1)
    written = jax.lax.bitcast_convert_type(cache["k"][0][:, :9], jnp.bfloat16)
    assert np.all(np.asarray(written, np.float32) != 0) and np.all(np.asarray(cache["k"][0][:, 9:]) == 0)


def test_left_padded_rows_match_unpadded(setup):
    cfg, params, toks = setup
    lengths = [20, 13, 5]
    P = 20
    batch = np.zeros((3, P), np.int32)
    pad = np.array([P - n for n in lengths], np.int32)
    for i, n in enumerate(lengths):
        batch[i, P - n:] = np.asarray(toks[i, :n])
    logits, _ = M.forward_cached(M.decode_params(params), jnp.asarray(batch), M.init_cache(cfg, 3, P), 0,
                                 jnp.asarray(pad), cfg)
    for i, n in enumerate(lengths):
        alone = M.forward(params, toks[i:i + 1, :n], cfg)
        np.testing.assert_allclose(logits[i, P - n:, :cfg.n_vocab], alone[0, :, :cfg.n_vocab], atol=2e-5)
    # A prefill asks for the last position's logits alone: the same numbers.
    last, _ = M.forward_cached(M.decode_params(params), jnp.asarray(batch), M.init_cache(cfg, 3, P), 0,
                               jnp.asarray(pad), cfg, last_only=True)
    assert last.shape == (3, 1, logits.shape[-1])
    np.testing.assert_allclose(last, logits[:, -1:], atol=1e-6)


def test_dropout_only_with_key(setup):
    cfg = cfg_(embed_dropout=0.1, attn_dropout=0.1, res_dropout=0.1)
    _, params, toks = setup
    a = M.forward(params, toks, cfg)
    b = M.forward(params, toks, cfg)
    np.testing.assert_array_equal(a, b)
    c = M.forward(params, toks, cfg, key=jax.random.PRNGKey(3))
    d = M.forward(params, toks, cfg, key=jax.random.PRNGKey(4))
    assert not np.allclose(c, a) and not np.allclose(c, d)


def test_remat_gives_identical_gradients(setup):
    cfg, params, toks = setup
    batch = jnp.concatenate([toks, toks[:, :1]], axis=1)
    g = jax.grad(lambda p, c: M.token_losses(p, batch, c).mean())
    a = g(params, cfg)
    for policy in ("nothing_saveable", "dots_saveable"):
        b = g(params, cfg.replace(remat=True, remat_policy=policy))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_allclose(x, y, atol=1e-6)


def test_layer_unrolling_does_not_change_results(setup):
    cfg, params, toks = setup
    batch = jnp.concatenate([toks, toks[:, :1]], axis=1)
    g = jax.value_and_grad(lambda p, c: M.token_losses(p, batch, c).mean())
    results = [g(params, cfg.replace(scan_unroll=u)) for u in (1, 2, 3)]
    assert M.layer_unroll(cfg) == 3 and M.layer_unroll(cfg.replace(n_layer=24)) == 1
    for loss, grads in results[1:]:
        np.testing.assert_allclose(loss, results[0][0], rtol=1e-6)
        for x, y in zip(jax.tree.leaves(grads), jax.tree.leaves(results[0][1])):
            np.testing.assert_allclose(x, y, atol=1e-6)


@pytest.mark.parametrize("T, dtype, tol", [(40, jnp.float32, 2e-6), (37, jnp.float32, 2e-6), (40, jnp.bfloat16, 2e-2),
                                          (37, jnp.bfloat16, 2e-2)])  # an odd last block: float32 outer products
def test_blocked_causal_attention_matches_full_matrix(T, dtype, tol):
    # Blocks of 16 query rows: 40 gives a ragged last block, 37 an odd length.
    q, k, v = (jax.random.normal(kk, (2, T, 3, 8), dtype) for kk in jax.random.split(jax.random.PRNGKey(2), 3))
    full = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    blocked = K._attend_causal(jnp.stack([q, k, v], axis=2), 16)
    np.testing.assert_allclose(np.asarray(blocked, np.float32), np.asarray(full, np.float32), atol=tol)
    loss = lambda f: lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v).astype(jnp.float32)))  # noqa: E731
    g_full = jax.grad(loss(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True)), (0, 1, 2))(q, k, v)
    g_blocked = jax.grad(loss(lambda q, k, v: K._attend_causal(jnp.stack([q, k, v], axis=2), 16)), (0, 1, 2))(q, k, v)
    for a, b in zip(g_blocked, g_full):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=tol * 5)


def test_sliced_output_head_gives_the_same_losses_and_gradients(setup, monkeypatch):
    cfg, params, toks = setup  # 3 x 19 targets = 57 rows: slices of 16 leave a ragged last one

    def direct(p):
        logits = M.forward(p, toks[:, :-1], cfg)
        picked = jnp.take_along_axis(logits, toks[:, 1:, None], axis=-1)[..., 0]
        return jax.nn.logsumexp(logits, axis=-1) - picked

    monkeypatch.setattr(M, "LOSS_ROWS", 16)
    sliced = M.token_losses(params, toks, cfg)
    np.testing.assert_allclose(sliced, direct(params), atol=1e-5)
    g_sliced = jax.grad(lambda p: M.token_losses(p, toks, cfg).mean())(params)
    g_direct = jax.grad(lambda p: direct(p).mean())(params)
    for a, b in zip(jax.tree.leaves(g_sliced), jax.tree.leaves(g_direct)):
        np.testing.assert_allclose(a, b, atol=1e-6)


# ----------------------------------------------------------------------------- bfloat16 against float32
BF16_UNIT_ROUNDOFF = 2.0 ** -8  # bfloat16 keeps 8 significant bits: one rounding errs by at most 2^-8


def bf16_tolerance(cfg, passes: int = 1) -> float:
    """The relative error (in norm) allowed between bfloat16 and float32 results.

    From the embedding to the logits the bf16 model rounds its activations 2 + 11 n_layer times
    (the embedding; per layer LN, qkv, attention probabilities, attention output, projection,
    residual sum, LN, fc, GELU, projection, residual sum; the final LN), each by a relative
    error of at most 2^-8. Independent rounding errors grow like the square root of their number;
    twice that is allowed. A gradient takes the path twice (forward and backward)."""
    return 2 * math.sqrt(passes * (2 + 11 * cfg.n_layer)) * BF16_UNIT_ROUNDOFF


def relative_error(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.fixture(scope="module")
def spread(setup):
    """Parameters far from GPT-2's near-uniform init: kernels and biases N(0, 0.2), LayerNorm gains
    1 + N(0, 0.2), embeddings N(0, 0.05). At init (std 0.02) every model predicts ~uniformly, so
    even all-zero weights give a bfloat16 loss within 0.002 of float32's."""
    cfg, params, toks = setup
    leaves, tree = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.PRNGKey(5), len(leaves))
    drawn = []
    for (path, leaf), key in zip(leaves, keys):
        name, noise = jax.tree_util.keystr(path), jax.random.normal(key, leaf.shape)
        drawn.append(0.05 * noise if name in ("['wte']", "['wpe']") else 1 + 0.2 * noise if "scale" in name
                     else 0.2 * noise)
    spread = jax.tree_util.tree_unflatten(tree, drawn)
    spread["wte"] = spread["wte"].at[cfg.n_vocab:].set(0.0)
    return cfg, spread, jnp.concatenate([toks, toks[:, :1]], axis=1)


def bf16_against_f32(spread):
    """(relative error of bf16's logits, {parameter: relative error of its bf16 gradient}), both
    against float32, traced afresh so that monkeypatched kernels are what runs."""
    cfg, params, batch = spread
    logits = lambda c: jax.jit(lambda p: M.forward(p, batch[:, :-1], c)[..., :c.n_vocab])(params)  # noqa: E731
    grads = lambda c: jax.jit(jax.grad(lambda p: M.token_losses(p, batch, c).mean()))(params)  # noqa: E731
    bf16 = cfg.replace(precision="bfloat16")
    g32, g16 = grads(cfg), grads(bf16)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(g16))  # float32 master gradients
    return relative_error(logits(bf16), logits(cfg)), {
        jax.tree_util.keystr(path): relative_error(_at(g16, path), g) for path, g in jax.tree_util.tree_leaves_with_path(g32)}


def _at(tree, path):
    for k in path:
        tree = tree[k.key] if hasattr(k, "key") else tree[k.idx]
    return tree


def test_bfloat16_logits_and_gradients_within_bfloat16_rounding_of_float32(spread):
    cfg = spread[0]
    logits_error, grad_errors = bf16_against_f32(spread)
    assert logits_error < bf16_tolerance(cfg)
    worst = max(grad_errors, key=grad_errors.get)
    assert grad_errors[worst] < bf16_tolerance(cfg, passes=2), worst
    # and the weights are far from uniform: the logits spread over several units
    logits = M.forward(spread[1], spread[2][:, :-1], cfg)[..., :cfg.n_vocab]
    assert float(jnp.std(logits)) > 0.3


def test_bfloat16_comparison_fails_for_mispaired_weight_gradient_rows(spread, monkeypatch):
    """Negative control: the bf16 weight gradient reorders the token rows of both operands alike
    (kernels._outer_product_sum); reordering only one pairs the wrong rows, and the gradient
    comparison must catch it."""
    original = K._outer_product_sum

    def mispaired(a, b):
        *lead, rows, cols = a.shape
        if a.dtype != jnp.bfloat16 or rows % 2:
            return original(a, b)
        n = len(lead)
        at = a.reshape(*lead, 2, rows // 2, cols).transpose(*range(n), n + 2, n + 1, n).reshape(*lead, cols, rows)
        return jnp.einsum("...pm,...mq->...pq", at, b, preferred_element_type=jnp.float32)  # b kept in order

    monkeypatch.setattr(K, "_outer_product_sum", mispaired)
    _, grad_errors = bf16_against_f32(spread)
    assert max(grad_errors.values()) > 3 * bf16_tolerance(spread[0], passes=2)


def test_bfloat16_comparison_fails_for_transposed_square_kernels(spread, monkeypatch):
    """Negative control: bf16 products that read square kernels (the [D, D] attention projection)
    as [out, in], decoding's layout, give logits outside bfloat16's rounding."""
    original = K._low_precision_matmul_fwd

    def transposed_square(x, w, transposed):
        square = w.shape[0] == w.shape[1]
        return original(x, w.T if square else w, transposed)

    monkeypatch.setattr(K, "_low_precision_matmul_fwd", transposed_square)
    monkeypatch.setattr(K, "native_dense", lambda *a: False)  # logits without a gradient: XLA's products too
    logits_error, _ = bf16_against_f32(spread)
    assert logits_error > 3 * bf16_tolerance(spread[0])


@pytest.mark.parametrize("rows", [16, 15])  # an odd token count takes the float32 weight-gradient path
@pytest.mark.parametrize("fn, w_shape, ref", [
    (K._low_precision_matmul, (24, 40), lambda x, w: x @ w),
    (lambda x, w: K._low_precision_matmul(x, w, True), (40, 24), lambda x, w: x @ w.T),  # the output head's use
])
def test_low_precision_products_have_the_gradients_of_the_plain_product(fn, w_shape, ref, rows):
    kx, kw, kg = jax.random.split(jax.random.PRNGKey(3), 3)
    x = jax.random.normal(kx, (rows, 24)).astype(jnp.bfloat16)
    w = jax.random.normal(kw, w_shape)
    g = jax.random.normal(kg, (rows, 40))
    y, vjp = jax.jit(lambda x, w: jax.vjp(fn, x, w))(x, w)
    dx, dw = jax.jit(vjp)(g)
    x32 = x.astype(jnp.float32)
    y_ref, vjp_ref = jax.vjp(ref, x32, w.astype(jnp.bfloat16).astype(jnp.float32))
    dx_ref, dw_ref = vjp_ref(g.astype(jnp.bfloat16).astype(jnp.float32))  # both with the cotangent rounded to bf16
    assert y.dtype == jnp.float32 and dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(dx, np.float32), dx_ref, rtol=1e-2, atol=2e-2)  # dx rounded to bf16
    np.testing.assert_allclose(dw, dw_ref, rtol=1e-5, atol=1e-4)
