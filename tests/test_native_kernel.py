"""Our compiled CPU kernels (native_kernel.py, csrc/): built on first use, the same products,
attention and losses as XLA's, used exactly where kernels says, and a clear fallback without them.

Decoding's kernels need AVX-512 (bfloat16: AVX-512 BF16), scoring's AVX-512 BF16 (by vdpbf16ps,
and on CPUs with AMX by tiles too: both are tested there); on a CPU without them the tests that
run them are skipped and the fallback tests still run (the model then never asks for them)."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt2train import kernels as K
from gpt2train import model as M
from gpt2train import native_kernel
from gpt2train.config import Config
from gpt2train.inference import hold_params

HAS_BF16 = "avx512_bf16" in K.cpu_flags()
HAS_AVX512 = {"avx512f", "avx512bw"} <= K.cpu_flags()
needs_bf16 = pytest.mark.skipif(not HAS_BF16, reason="this CPU has no AVX-512 bfloat16: the kernel is never used here")
needs_avx512 = pytest.mark.skipif(not HAS_AVX512, reason="this CPU has no AVX-512: the kernels are never used here")
HAS_AMX = {"amx_bf16", "amx_tile"} <= K.cpu_flags()
TILES = [False, True] if HAS_AMX else [False]  # how the scoring kernels multiply: vdpbf16ps, AMX tiles


def exact_product(x, w):
    """x . w.T in float64 from the inputs' values: what float32 accumulation approximates."""
    return np.asarray(x, np.float64) @ np.asarray(w, np.float64).T


@pytest.mark.parametrize("dtype", [
    pytest.param(jnp.bfloat16, marks=needs_bf16), pytest.param(jnp.float32, marks=needs_avx512)])
@pytest.mark.parametrize("rows,k,n", [(1, 768, 2304), (2, 3072, 768), (1, 100, 7), (2, 37, 33), (11, 64, 50),
                                      (2, 768, 50304), (16, 3072, 200), (5, 96, 40), (3, 104, 70)])
def test_rows_matmul_is_the_product_at_any_shape(rows, k, n, dtype):
    """Columns split over threads; kernel rows in pairs (an odd one left), K not a multiple of the
    vector step (masked tail), more rows than one pass takes (11 = 8 + 3); bfloat16 by vdpbf16ps,
    and 2-16 rows in blocks of 16 kernel rows (the rest by pairs): by tiles on AMX CPUs, else by
    vdpbf16ps with each row given 16 / (rows rounded up to a power of two) lanes (2 rows 8 lanes,
    3 and 5 rows 4 and 2 with idle ones, 11 and 16 rows 1; K = 37 fits no lanes); float32 by FMA."""
    assert native_kernel.available()
    keys = jax.random.split(jax.random.key(rows * k + n), 2)
    x = jax.random.normal(keys[0], (rows, k)).astype(dtype)
    w = jax.random.normal(keys[1], (n, k)).astype(dtype)
    out = jax.jit(native_kernel.rows_matmul)(x, w)
    assert out.shape == (rows, n) and out.dtype == jnp.float32
    exact = exact_product(x, w)
    # float32 sums of k products (exact for bfloat16s): a few float32 roundings of each and of the sum
    bound = 4 * k * np.finfo(np.float32).eps * np.abs(np.asarray(x, np.float64)) @ np.abs(np.asarray(w, np.float64)).T
    assert np.all(np.abs(np.asarray(out, np.float64) - exact) <= bound + 1e-6)


@needs_avx512
@pytest.mark.parametrize("k,n", [(768, 2304), (100, 7), (37, 33), (3072, 203)])
def test_one_float32_row_gets_the_bits_it_gets_in_a_batch(k, n):
    """One row takes four kernel rows a pass, several rows take pairs: each output is still summed
    in one order, so a text decodes to the same bits alone and in a batch (N not a multiple of
    four, K with a masked tail)."""
    assert native_kernel.available()
    keys = jax.random.split(jax.random.key(k + n), 2)
    x = jax.random.normal(keys[0], (3, k))
    w = jax.random.normal(keys[1], (n, k))
    batch = jax.jit(native_kernel.rows_matmul)(x, w)
    for i in range(3):
        np.testing.assert_array_equal(jax.jit(native_kernel.rows_matmul)(x[i:i + 1], w)[0], batch[i])


@needs_bf16
def test_matmul_takes_the_kernel_only_where_native_rows_says_and_its_gradient_is_xlas():
    x1 = jax.random.normal(jax.random.key(0), (1, 96)).astype(jnp.bfloat16)
    x4 = jax.random.normal(jax.random.key(1), (4, 96)).astype(jnp.bfloat16)
    x17 = jax.random.normal(jax.random.key(3), (17, 96)).astype(jnp.bfloat16)
    w = jax.random.normal(jax.random.key(2), (40, 96)).astype(jnp.bfloat16)
    def uses_kernel(x, w, impl="cpu", decoding=True, **kw):
        return native_kernel.TARGET in jax.jit(
            lambda x, w: K.matmul(x, w, impl=impl, decoding=decoding, **kw)).lower(x, w).as_text()
    assert uses_kernel(x1, w, transposed=True)
    assert uses_kernel(x4, w, transposed=True)  # by AMX, or by vdpbf16ps with the rows sharing its lanes
    assert not uses_kernel(x17, w, transposed=True)  # past NATIVE_ROWS: XLA's own
    assert not uses_kernel(x1, w.T)                  # [in, out] kernels: XLA's own
    assert uses_kernel(x1.astype(jnp.float32), w.astype(jnp.float32), transposed=True)  # float32 too
    assert not uses_kernel(x17.astype(jnp.float32), w.astype(jnp.float32), transposed=True)
    assert not uses_kernel(x1, w, "standard", transposed=True)
    assert not uses_kernel(x1, w, decoding=False, transposed=True)  # training and evaluation: XLA's own

    def loss(x, w, via):
        return jnp.sum(K.matmul(x, w, transposed=True, impl=via, decoding=True) ** 2)
    grads = jax.grad(loss, argnums=(0, 1))(x1, w, "cpu")
    reference = jax.grad(loss, argnums=(0, 1))(x1.astype(jnp.float32), w.astype(jnp.float32), "standard")
    for got, want in zip(grads, reference):
        scale = np.max(np.abs(np.asarray(want)))
        assert np.max(np.abs(np.asarray(got, np.float32) - np.asarray(want))) <= 4 * 2.0 ** -8 * scale


@pytest.mark.parametrize("precision,head,tolerance", [
    pytest.param("bfloat16", "wte_bits", 8 * 2.0 ** -8, marks=needs_bf16),
    pytest.param("float32", "wte", 1e-5, marks=needs_avx512)])
def test_decoding_one_text_reads_the_head_as_it_lies_and_matches_xla(monkeypatch, precision, head, tolerance):
    """Batch 1: [out, in] layers and the head [V, D], the kernel's layout (in bfloat16 as its
    bits, wte_bits); batch 17 (past NATIVE_ROWS): wte_t [D, V] again. The logits of a decode step
    equal XLA's within the precision's rounding of the activations between layers."""
    cfg = Config(n_ctx=32, n_embd=64, n_layer=2, n_head=4, n_vocab=300, precision=precision).validate()
    params = hold_params(M.init_params(cfg, jax.random.key(0)), cfg)
    one = M.laid_out_for(M.decode_params(params), 1)
    assert head in one and "wte_t" not in one and "kernel_t" in one["layers"][0]["mlp"]["c_fc"]
    assert one[head].shape == params["wte"].shape
    assert one[head].dtype == (jnp.uint16 if precision == "bfloat16" else jnp.float32)

    def step_logits(p):
        cache = M.init_cache(cfg, 1, cfg.n_ctx)
        tokens = jnp.asarray([[5, 17, 250, 3]], jnp.int32)
        logits, _ = jax.jit(lambda p, c: M.forward_cached(p, tokens, c, 0, jnp.zeros(1, jnp.int32), cfg,
                                                          last_only=True))(p, cache)
        return np.asarray(logits, np.float32)
    native = step_logits(one)
    monkeypatch.setattr(K, "native_rows", lambda rows, dtype: False)
    xla = step_logits(one)
    assert np.max(np.abs(native - xla)) <= tolerance * np.max(np.abs(xla))
    monkeypatch.undo()
    many = M.laid_out_for(M.laid_out_for(M.decode_params(params), 1), K.NATIVE_ROWS + 1)
    assert "wte_t" in many and head not in many
    np.testing.assert_array_equal(np.asarray(many["wte_t"]), np.asarray(params["wte"]).T)


def run_python(code: str, **env):
    full = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=full, timeout=300)


def test_without_a_compiler_decoding_warns_once_and_multiplies_with_xla(tmp_path):
    """A broken compiler ($CXX) is one warning naming the way out; products still come out right."""
    fake = tmp_path / "c++"
    fake.write_text("#!/bin/sh\necho 'fake: no compiler here' >&2\nexit 1\n")
    fake.chmod(0o755)
    done = run_python("""
        import warnings, jax, jax.numpy as jnp, numpy as np
        from gpt2train import kernels as K, native_kernel
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            x = jnp.ones((1, 40), jnp.bfloat16); w = jnp.ones((9, 40), jnp.bfloat16)
            a = K.matmul(x, w, transposed=True, impl="cpu", decoding=True)
            b = K.matmul(x, w, transposed=True, impl="cpu", decoding=True)
        assert not native_kernel.available()
        assert np.all(np.asarray(a) == 40) and np.all(np.asarray(b) == 40)
        notes = [str(c.message) for c in caught if "native" in str(c.message)]
        print(len(notes)); print(notes[0] if notes else "")
        """, CXX=str(fake), XDG_CACHE_HOME=str(tmp_path / "cache"))
    assert done.returncode == 0, done.stderr
    count, message = done.stdout.splitlines()[:2]
    if HAS_BF16:
        assert count == "1" and "GPT2TRAIN_NATIVE_KERNEL=off" in message and "fake: no compiler here" in message
    else:
        assert count == "0"  # never asked for: nothing to warn about


@needs_bf16
def test_off_switch_and_one_build_per_source_and_cpu(tmp_path):
    off = run_python("""
        from gpt2train import native_kernel; print(native_kernel.available())
        """, GPT2TRAIN_NATIVE_KERNEL="off", XDG_CACHE_HOME=str(tmp_path / "off"))
    assert off.stdout.strip() == "False" and not (tmp_path / "off").exists()
    code = "from gpt2train import native_kernel; print(native_kernel.available())"
    for _ in range(2):
        on = run_python(code, XDG_CACHE_HOME=str(tmp_path / "on"))
        assert on.stdout.strip() == "True", on.stderr
    built = list((tmp_path / "on" / "gpt2train" / "native").iterdir())
    assert len(built) == 1 and built[0].name.startswith("kernels-") and built[0].suffix == ".so"


def reference_attention(q, k_bits, v_bits, mask):
    """The model's XLA formula in float64: scores of the allowed slots (others -1e30), softmax, times v."""
    as64 = lambda bits: np.asarray(jax.lax.bitcast_convert_type(bits, jnp.bfloat16), np.float64)  # noqa: E731
    q, k, v, mask = np.asarray(q, np.float64), as64(k_bits), as64(v_bits), np.asarray(mask)
    BH, T, Dh = q.shape
    S, H = mask.shape[-1], BH // mask.shape[0]
    scores = np.einsum("ntd,nsd->nts", q, k[:, :S]) / np.sqrt(Dh)
    scores = np.where(np.repeat(mask, H, axis=0), scores, -1e30)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    return np.einsum("nts,nsd->ntd", probs / probs.sum(-1, keepdims=True), v[:, :S])


@needs_bf16
@pytest.mark.parametrize("B,H,T,L,S,Dh", [(2, 3, 1, 40, 40, 64), (3, 2, 5, 64, 37, 64), (1, 4, 2, 20, 17, 24)])
def test_cached_attention_is_the_models_softmax_over_the_allowed_slots(B, H, T, L, S, Dh):
    """Spans shorter than the caches (S < L, read in place), several query positions, a head size
    that is not a multiple of 32, a row that may read nothing (averages every slot, as XLA's
    path does) and rows of different lengths."""
    keys = jax.random.split(jax.random.key(B * 100 + S), 3)
    q = (jax.random.normal(keys[0], (B * H, T, Dh)) * 2).astype(jnp.bfloat16)
    bits = lambda key: jax.lax.bitcast_convert_type(  # noqa: E731
        jax.random.normal(key, (B * H, L, Dh)).astype(jnp.bfloat16), jnp.uint16)
    k_bits, v_bits = bits(keys[1]), bits(keys[2])
    lengths = np.arange(B)[:, None] * 3 + np.arange(T)[None, :] + S // 2   # row b, position t reads this many
    mask = np.arange(S)[None, None, :] < np.minimum(lengths, S)[:, :, None]
    mask[0, 0] = False                                                       # a padding row: no slot allowed
    out = jax.jit(native_kernel.cached_attention)(q, k_bits, v_bits, jnp.asarray(mask))
    expected = reference_attention(q, k_bits, v_bits, mask)
    assert out.shape == q.shape and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out, np.float64), expected, rtol=0, atol=1e-4 * np.abs(expected).max())


@needs_bf16
def test_decode_step_never_converts_the_embedding_table():
    """XLA:CPU gathers bfloat16 rows in float32, converting the whole table first: the decode
    step of a server (one step per compiled call) paid for 77 MB of conversion per token at
    124M. Held as bits (wte_bits), the table is gathered as it lies: the compiled step holds no
    float32 array of the table's shape, and the embedding equals the bfloat16 table's rows."""
    cfg = Config(n_ctx=32, n_embd=64, n_layer=2, n_head=4, n_vocab=300, precision="bfloat16").validate()
    params = hold_params(M.init_params(cfg, jax.random.key(0)), cfg)
    one = M.laid_out_for(M.decode_params(params), 1)
    cache, pad, tokens = M.init_cache(cfg, 1, cfg.n_ctx), jnp.zeros(1, jnp.int32), jnp.asarray([[7]], jnp.int32)
    step = jax.jit(lambda p, c: M.forward_cached(p, tokens, c, 3, pad, cfg))
    hlo = step.lower(one, cache).compile().as_text()
    V, D = params["wte"].shape
    assert f"f32[{V},{D}]" not in hlo and f"f32[{D},{V}]" not in hlo
    rows = M.embed(one, jnp.asarray([[7, 299]]), jnp.asarray([[0, 1]]), cfg, jnp.float32)
    expected = params["wte"][jnp.asarray([[7, 299]])].astype(jnp.float32) + params["wpe"][:2].astype(jnp.float32)
    np.testing.assert_allclose(np.asarray(rows), np.asarray(expected), rtol=2 ** -8)


# ----------------------------------------------------------------------------- scoring (AVX-512 BF16, AMX)
def exact_losses(x, w, targets, n_vocab):
    """Cross-entropy of each row of x under the first n_vocab rows of w, in float64."""
    logits = exact_product(x, w)[:, :n_vocab]
    top = logits.max(-1)
    logz = top + np.log(np.exp(logits - top[:, None]).sum(-1))
    return logz - logits[np.arange(len(targets)), np.asarray(targets)]


@needs_bf16
@pytest.mark.parametrize("tiles", TILES)
@pytest.mark.parametrize("N,D,n_vocab,V_pad", [(1, 32, 77, 128), (33, 96, 96, 128), (300, 64, 1000, 1024),
                                               (40, 768, 50257, 50304)])
def test_head_losses_are_the_cross_entropy_over_the_real_vocabulary(N, D, n_vocab, V_pad, tiles):
    """Token counts that fill no whole block of 32 (1, 33, 300: tails within a pass and across
    passes of 256), a vocabulary that ends inside a block of 32 (77, 1000, GPT-2's 50257) or on
    one (96); padding rows of w that would win the softmax if they were read; targets at both
    ends of the vocabulary."""
    assert native_kernel.available()
    keys = jax.random.split(jax.random.key(N + D), 3)
    x = jax.random.normal(keys[0], (N, D)).astype(jnp.bfloat16)
    w = (jax.random.normal(keys[1], (V_pad, D)) * 0.2).astype(jnp.bfloat16)
    w = w.at[n_vocab:].set(5.0)  # rows past n_vocab must be skipped, not merely small
    targets = jax.random.randint(keys[2], (N,), 0, n_vocab).at[0].set(n_vocab - 1)
    if N > 1:
        targets = targets.at[1].set(0)
    out = jax.jit(native_kernel.head_losses, static_argnums=(3, 4))(x, w, targets, n_vocab, tiles)
    assert out.shape == (N,) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out, np.float64), exact_losses(x, w, targets, n_vocab), rtol=1e-5, atol=1e-4)


def bf16_model(n_vocab=300, n_embd=64, n_head=2):
    cfg = Config(n_ctx=64, n_embd=n_embd, n_layer=2, n_head=n_head, n_vocab=n_vocab, precision="bfloat16",
                 kernels="cpu").validate()
    params = M.init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (3, 51), 0, n_vocab)  # T = 50: a tail block of 18
    return cfg, params, tokens


SCORING_TARGETS = (native_kernel.HEAD_LOSSES_TARGET, native_kernel.CAUSAL_TARGET, native_kernel.DENSE_TARGET)


@needs_bf16
def test_evaluation_takes_the_scoring_kernels_and_a_gradient_never_does(monkeypatch):
    """Without a gradient, bfloat16 token losses run the layer products, the attention and the
    head by our kernels and agree with XLA's; the training step's gradient is XLA's own, the
    kernels nowhere in it."""
    cfg, params, tokens = bf16_model()
    loss = lambda p: M.token_losses(p, tokens, cfg).mean()  # noqa: E731
    evaluation = jax.jit(lambda p: M.token_losses(p, tokens, cfg)).lower(params).as_text()
    assert all(target in evaluation for target in SCORING_TARGETS)
    gradient = jax.jit(jax.grad(loss)).lower(params).as_text()
    # 150 tokens: no whole number of 32-token blocks for the products' training kernels; attention's
    # (native_attention_training, CPUs with AMX) take any length.
    assert not any(f"@{target}(" in gradient for target in SCORING_TARGETS)  # a call, not a longer name's prefix
    assert (f"@{native_kernel.CAUSAL_BACKWARD_TARGET}(" in gradient) == HAS_AMX
    native = np.asarray(M.token_losses(params, tokens, cfg))
    grads = jax.grad(loss)(params)
    monkeypatch.setattr(K, "native_head_losses", lambda *a: False)
    monkeypatch.setattr(K, "native_dense", lambda *a: False)
    monkeypatch.setattr(K, "native_attention_training", lambda: False)
    # Without attention's training kernels, the gradient is XLA's alone, the same bits.
    xla_grads = jax.grad(loss)(params)
    monkeypatch.setattr(K, "native_causal_attention", lambda *a: False)
    xla = np.asarray(M.token_losses(params, tokens, cfg))
    np.testing.assert_allclose(native, xla, rtol=0, atol=0.02)  # bfloat16 activations, rounded differently
    assert abs(native.mean() - xla.mean()) < 2e-3
    for a, b in zip(jax.tree.leaves(xla_grads), jax.tree.leaves(jax.grad(loss)(params))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(xla_grads)):  # attention's kernels: bfloat16's roundings
        a, b = np.asarray(a), np.asarray(b)
        assert np.abs(a - b).max() <= 0.05 * (np.abs(b).max() + 1e-12)


@needs_bf16
def test_scoring_kernels_stay_out_where_they_cannot_run():
    """float32, a head size the tiles do not take (48), a model dimension the head cannot (80),
    `standard` kernels: XLA's own."""
    def lowered(cfg, params, tokens):
        return jax.jit(lambda p: M.token_losses(p, tokens, cfg)).lower(params).as_text()
    cfg, params, tokens = bf16_model()
    assert native_kernel.CAUSAL_TARGET not in lowered(cfg.replace(precision="float32"), params, tokens)
    assert native_kernel.HEAD_LOSSES_TARGET not in lowered(cfg.replace(kernels="standard"), params, tokens)
    cfg, params, tokens = bf16_model(n_embd=96, n_head=2)  # head size 48
    text = lowered(cfg, params, tokens)
    assert native_kernel.CAUSAL_TARGET not in text and native_kernel.HEAD_LOSSES_TARGET in text
    cfg, params, tokens = bf16_model(n_embd=80, n_head=2)  # head size 40, model dimension 80
    assert native_kernel.HEAD_LOSSES_TARGET not in lowered(cfg, params, tokens)


def exact_causal_attention(qkv):
    q, k, v = (np.asarray(qkv[:, :, i], np.float64) for i in range(3))
    T, Dh = q.shape[1], q.shape[-1]
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(Dh)
    scores = np.where(np.tril(np.ones((T, T), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    return np.einsum("bhqk,bkhd->bqhd", probs / probs.sum(-1, keepdims=True), v)


@needs_bf16
@pytest.mark.parametrize("tiles", TILES)
@pytest.mark.parametrize("B,T,H,Dh", [(1, 1, 1, 32), (2, 70, 3, 64), (1, 33, 2, 128), (3, 96, 2, 32)])
def test_causal_attention_is_softmax_attention_over_earlier_positions(B, T, H, Dh, tiles):
    """One position; lengths that end inside a block of 32 keys (70, 33) and on one (96); every
    head size the tiles take; scores large enough that the running maximum moves between blocks."""
    assert native_kernel.available()
    qkv = (jax.random.normal(jax.random.key(T * H + Dh), (B, T, 3, H, Dh)) * 2).astype(jnp.bfloat16)
    out = jax.jit(native_kernel.causal_attention, static_argnums=1)(qkv, tiles)
    assert out.shape == (B, T, H, Dh) and out.dtype == jnp.bfloat16
    exact = exact_causal_attention(qkv)
    # bfloat16 probabilities and a bfloat16 result: a few roundings of 2^-8 of the largest value
    np.testing.assert_allclose(np.asarray(out, np.float64), exact, rtol=0, atol=4 * 2.0 ** -8 * np.abs(exact).max())
    xla = np.asarray(K._attend_causal(qkv), np.float64)
    assert np.abs(np.asarray(out, np.float64) - exact).max() <= 1.5 * np.abs(xla - exact).max() + 1e-6


def exact_causal_attention_gradient(qkv, dout):
    """d(sum(attention(qkv) * dout)) / dqkv in float64, by the softmax's gradient written out."""
    q, k, v = (np.asarray(qkv[:, :, i], np.float64) for i in range(3))
    g = np.asarray(dout, np.float64)
    T, Dh = q.shape[1], q.shape[-1]
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(Dh)
    scores = np.where(np.tril(np.ones((T, T), bool)), scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    dp = np.einsum("bqhd,bkhd->bhqk", g, v)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True)) / np.sqrt(Dh)
    dq, dk = np.einsum("bhqk,bkhd->bqhd", ds, k), np.einsum("bhqk,bqhd->bkhd", ds, q)
    return np.stack([dq, dk, np.einsum("bhqk,bqhd->bkhd", p, g)], axis=2)


@needs_bf16
@pytest.mark.parametrize("tiles", TILES)
@pytest.mark.parametrize("B,T,H,Dh", [(1, 1, 1, 32), (2, 70, 3, 64), (1, 33, 2, 128), (2, 96, 2, 32)])
def test_causal_attention_backward_is_the_softmax_attentions_gradient(B, T, H, Dh, tiles):
    """The training pair: causal_attention_lse's output is causal_attention's and its logsumexp
    the scores' own; causal_attention_backward's dq, dk and dv are the float64 gradient's to
    bfloat16's roundings (of the probabilities, their gradient and the result), at lengths that end
    inside a block of 32 and on one, and about as far from it as XLA's bfloat16 gradient is."""
    assert native_kernel.available()
    keys = jax.random.split(jax.random.key(T * H + Dh + 1))
    qkv = (jax.random.normal(keys[0], (B, T, 3, H, Dh)) * 2).astype(jnp.bfloat16)
    dout = jax.random.normal(keys[1], (B, T, H, Dh)).astype(jnp.bfloat16)
    out, lse = jax.jit(native_kernel.causal_attention_lse, static_argnums=1)(qkv, tiles)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(jax.jit(native_kernel.causal_attention, static_argnums=1)(qkv, tiles)))
    q, k = (np.asarray(qkv[:, :, i], np.float64) for i in range(2))
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(Dh) + np.where(np.tril(np.ones((T, T), bool)), 0, -np.inf)
    top = scores.max(-1)
    np.testing.assert_allclose(np.asarray(lse), top + np.log(np.exp(scores - top[..., None]).sum(-1)), rtol=0, atol=1e-4)
    dqkv = jax.jit(native_kernel.causal_attention_backward, static_argnums=4)(qkv, out, dout, lse, tiles)
    assert dqkv.shape == qkv.shape and dqkv.dtype == jnp.bfloat16
    exact = exact_causal_attention_gradient(qkv, dout)
    ours = np.asarray(dqkv, np.float64)
    xla = np.asarray(jax.grad(lambda x: jnp.sum(K._attend_causal(x).astype(jnp.float32) * dout))(qkv), np.float64)
    for i, name in enumerate("qkv"):
        error, scale = np.abs(ours[:, :, i] - exact[:, :, i]).max(), np.abs(exact[:, :, i]).max()
        assert error <= 4 * 2.0 ** -8 * scale, (name, error, scale)
        # delta = dO . O comes from the bfloat16 output, as in flash attention's backward; XLA's
        # sums dP . P instead (0.4-1.6x our error in these cases)
        assert error <= 2 * np.abs(xla[:, :, i] - exact[:, :, i]).max() + 1e-6, name


@needs_bf16
@pytest.mark.parametrize("tiles", TILES)
@pytest.mark.parametrize("N,K_in,M_out,gelu", [(1, 32, 32, False), (70, 64, 96, True), (33, 768, 3072, True),
                                               (300, 3072, 64, False)])
def test_dense_is_the_product_plus_bias_through_gelu(N, K_in, M_out, gelu, tiles):
    """Token counts that fill no whole block of 32 (1, 33, 70, 300); panels of columns narrower
    than the output (3072 columns at K 768, 64 at K 3072); GELU's tanh form on both signs; K
    past one chunk of vdpbf16ps's (256) and within one."""
    assert native_kernel.available()
    keys = jax.random.split(jax.random.key(N + K_in + M_out), 3)
    x = jax.random.normal(keys[0], (N, K_in)).astype(jnp.bfloat16)
    w = jax.random.normal(keys[1], (K_in, M_out)) * (2 / np.sqrt(K_in))
    bias = jax.random.normal(keys[2], (M_out,))
    out = jax.jit(native_kernel.dense, static_argnums=(3, 4))(x, w, bias, gelu, tiles)
    assert out.shape == (N, M_out) and out.dtype == jnp.bfloat16
    y = np.asarray(x, np.float64) @ np.asarray(w.astype(jnp.bfloat16), np.float64) + np.asarray(bias, np.float64)
    if gelu:
        y = 0.5 * y * (1 + np.tanh(np.sqrt(2 / np.pi) * (y + 0.044715 * y ** 3)))
    # one bfloat16 rounding of the result (2^-9 relative), float32 sums and exp well inside it
    np.testing.assert_allclose(np.asarray(out, np.float64), y, rtol=2.0 ** -8, atol=1e-5 * np.abs(y).max())


@needs_bf16
@pytest.mark.parametrize("tiles", TILES)
@pytest.mark.parametrize("N,K_in,M_out", [(33, 64, 96), (64, 768, 3072)])
def test_dense_gelu_gives_dense_through_gelu_and_the_pre_activation(N, K_in, M_out, tiles):
    """Training's c_fc: the output dense gives with GELU and the pre-activation dense gives
    without, bit for bit."""
    assert native_kernel.available()
    keys = jax.random.split(jax.random.key(N + K_in), 3)
    x = jax.random.normal(keys[0], (N, K_in)).astype(jnp.bfloat16)
    w = jax.random.normal(keys[1], (K_in, M_out)) / np.sqrt(K_in) * 2
    bias = jax.random.normal(keys[2], (M_out,))
    y, h = jax.jit(native_kernel.dense_gelu, static_argnums=3)(x, w, bias, tiles)
    dense = jax.jit(native_kernel.dense, static_argnums=(3, 4))
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(dense(x, w, bias, True, tiles), np.float32))
    np.testing.assert_array_equal(np.asarray(h, np.float32), np.asarray(dense(x, w, bias, False, tiles), np.float32))


@needs_bf16
def test_gelu_backward_is_g_times_gelus_slope():
    """gh = g * GELU'(h) (tanh form) against float64 autodiff of GELU, over both signs, the flat
    tails (|h| up to 12) and the steep middle; one bfloat16 rounding of the result."""
    assert native_kernel.available()
    h = jnp.concatenate([jnp.linspace(-12, 12, 4000), jax.random.normal(jax.random.key(0), (96,)) * 3])
    h = h.astype(jnp.bfloat16).reshape(64, 64)
    g = jax.random.normal(jax.random.key(1), h.shape).astype(jnp.bfloat16)
    gh = jax.jit(native_kernel.gelu_backward)(h, g)
    assert gh.dtype == jnp.bfloat16 and gh.shape == h.shape
    x = np.asarray(h, np.float64)
    c = np.sqrt(2 / np.pi)
    t = np.tanh(c * (x + 0.044715 * x ** 3))
    slope = 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * 0.044715 * x * x)
    want = np.asarray(g, np.float64) * slope
    np.testing.assert_allclose(np.asarray(gh, np.float64), want, rtol=2.0 ** -8, atol=1e-6)
    # and what XLA's autodiff of kernels.gelu gives, to its own rounding
    xla = jax.vjp(K.gelu, h)[1](g)[0]
    np.testing.assert_allclose(np.asarray(gh, np.float64), np.asarray(xla, np.float64), rtol=2.0 ** -7, atol=1e-5)


@needs_bf16
@pytest.mark.parametrize("tiles", TILES)
@pytest.mark.parametrize("N,K_in,M_out", [(32, 32, 32), (64, 768, 96), (96, 64, 3072), (1024, 96, 64)])
def test_dense_backward_is_the_products_gradient(N, K_in, M_out, tiles):
    """dx = dy . w^T, dw = x^T . dy and the bias's db = dy's column sums from bfloat16 operands (w
    rounded to bfloat16 as the forward has it), summed in float32: a sum over many tokens (1024)
    and over a wide output (3072)."""
    assert native_kernel.available()
    keys = jax.random.split(jax.random.key(N + K_in + M_out), 3)
    x = jax.random.normal(keys[0], (N, K_in)).astype(jnp.bfloat16)
    w = jax.random.normal(keys[1], (K_in, M_out)) * (2 / np.sqrt(K_in))
    dy = jax.random.normal(keys[2], (N, M_out)).astype(jnp.bfloat16)
    dx, dw, db = jax.jit(native_kernel.dense_backward, static_argnums=3)(x, w, dy, tiles)
    assert dx.shape == (N, K_in) and dx.dtype == jnp.bfloat16 and dw.shape == (K_in, M_out) and dw.dtype == jnp.float32
    assert db.shape == (M_out,) and db.dtype == jnp.float32
    x64, dy64 = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    want_dx = dy64 @ np.asarray(w.astype(jnp.bfloat16), np.float64).T
    want_dw = x64.T @ dy64
    np.testing.assert_allclose(np.asarray(dx, np.float64), want_dx, rtol=2.0 ** -8, atol=1e-5 * np.abs(want_dx).max())
    np.testing.assert_allclose(np.asarray(dw), want_dw, rtol=1e-5, atol=1e-5 * np.abs(want_dw).max())
    np.testing.assert_allclose(np.asarray(db), dy64.sum(0), rtol=1e-5, atol=1e-5 * np.abs(dy64.sum(0)).max())


@needs_bf16
@pytest.mark.parametrize("tiles", TILES)
@pytest.mark.parametrize("N,D,n_vocab,V_pad", [(64, 64, 300, 320), (32, 96, 1000, 1056)])
def test_head_losses_kept_are_head_losses_with_their_logsumexp_and_logits(N, D, n_vocab, V_pad, tiles):
    """Training's forward: the same losses as head_losses, each token's logsumexp, and every block
    of logits x . w^T in the layout head_grads reads (token blocks, vocabulary blocks, 32 tokens by
    32 vocabulary rows), the last block's rows past n_vocab included."""
    assert native_kernel.available()
    keys = jax.random.split(jax.random.key(N + n_vocab), 3)
    x = jax.random.normal(keys[0], (N, D)).astype(jnp.bfloat16)
    w = (jax.random.normal(keys[1], (V_pad, D)) / np.sqrt(D) * 3).astype(jnp.bfloat16)
    targets = jax.random.randint(keys[2], (N,), 0, n_vocab)
    losses, lse, logits = jax.jit(native_kernel.head_losses_kept, static_argnums=(3, 4))(x, w, targets, n_vocab, tiles)
    alone = jax.jit(native_kernel.head_losses, static_argnums=(3, 4))(x, w, targets, n_vocab, tiles)
    np.testing.assert_array_equal(np.asarray(losses), np.asarray(alone))
    blocks = -(-n_vocab // 32)
    want = np.asarray(x, np.float64) @ np.asarray(w, np.float64)[:blocks * 32].T
    assert logits.shape == (N // 32, blocks * 1024) and logits.dtype == jnp.float32
    got = np.asarray(logits).reshape(N // 32, blocks, 32, 32).transpose(0, 2, 1, 3).reshape(N, blocks * 32)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    real = want[:, :n_vocab]
    exact = np.log(np.exp(real - real.max(-1, keepdims=True)).sum(-1)) + real.max(-1)
    np.testing.assert_allclose(np.asarray(lse), exact, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(losses), exact - real[np.arange(N), np.asarray(targets)], rtol=1e-4, atol=1e-5)


@needs_bf16
@pytest.mark.parametrize("tiles", TILES)
# 4,512 rows: dx sums the vocabulary in spans (products.cc kSumSpan), the last one short.
@pytest.mark.parametrize("N,D,n_vocab,V_pad", [(32, 64, 300, 320), (64, 96, 1000, 1024), (96, 768, 70, 96),
                                               (32, 64, 4500, 4512)])
@pytest.mark.parametrize("kept", [False, True])
def test_head_grads_are_the_cross_entropys_gradient(N, D, n_vocab, V_pad, tiles, kept):
    """dx = g . w and dw = g^T . x for g = (softmax over the real vocabulary - one-hot) * dl:
    padding rows get no gradient, a target in the last block of 32, logits spread widely; from
    logits computed again, or kept by the forward (head_losses_kept) with its logsumexp."""
    assert native_kernel.available()
    keys = jax.random.split(jax.random.key(N + D + n_vocab), 4)
    x = (jax.random.normal(keys[0], (N, D)) * 2).astype(jnp.bfloat16)
    w = (jax.random.normal(keys[1], (V_pad, D)) / np.sqrt(D) * 3).astype(jnp.bfloat16)
    targets = jax.random.randint(keys[2], (N,), 0, n_vocab).at[0].set(n_vocab - 1)
    dl = jax.random.uniform(keys[3], (N,), minval=0.5, maxval=2.0)
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    logits = x64 @ w64[:n_vocab].T
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    g = np.exp(logits - lse[:, None])
    g[np.arange(N), np.asarray(targets)] -= 1
    g *= np.asarray(dl, np.float64)[:, None]
    lse_in, logits_in = jnp.asarray(lse, jnp.float32), None
    if kept:
        _, lse_in, logits_in = jax.jit(native_kernel.head_losses_kept, static_argnums=(3, 4))(x, w, targets, n_vocab, tiles)
        np.testing.assert_allclose(np.asarray(lse_in), lse, rtol=1e-5)
    dx, dw = jax.jit(native_kernel.head_grads, static_argnums=(5, 6))(x, w, targets, lse_in, dl, n_vocab, tiles,
                                                                       logits_in)
    assert dx.shape == (N, D) and dx.dtype == jnp.bfloat16 and dw.shape == (V_pad, D) and dw.dtype == jnp.float32
    want_dx, want_dw = g @ w64[:n_vocab], g.T @ x64
    # g is rounded to bfloat16 once before both products (2^-9 relative each)
    np.testing.assert_allclose(np.asarray(dx, np.float64), want_dx, rtol=0, atol=2.0 ** -7 * np.abs(want_dx).max())
    np.testing.assert_allclose(np.asarray(dw[:n_vocab]), want_dw, rtol=0, atol=2.0 ** -7 * np.abs(want_dw).max())
    assert not np.asarray(dw[n_vocab:]).any()


def exact_layer_norm(x, scale, bias, dy):
    """LayerNorm in float64 and its vjp at dy: (y, dx, dscale, dbias), and the sizes their float32
    errors scale with (for the sums over rows, the sums of their terms' magnitudes)."""
    x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    scale, bias = np.asarray(scale, np.float64), np.asarray(bias, np.float64)
    D = x.shape[-1]
    xhat = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + M.LN_EPS)
    g = dy * scale
    dx = (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True)) / np.sqrt(
        x.var(-1, keepdims=True) + M.LN_EPS)
    rows = tuple(range(x.ndim - 1))
    assert dx.shape[-1] == D
    y = xhat * scale + bias
    return (y, dx, (dy * xhat).sum(rows), dy.sum(rows)), (np.abs(y), np.abs(dx), np.abs(dy * xhat).sum(rows),
                                                         np.abs(dy).sum(rows))


@needs_avx512
@pytest.mark.parametrize("shape", [(1, 16), (37, 64), (96, 768), (2, 32, 48)])
def test_layer_norm_and_its_gradient_are_float64s_to_bfloat16s_rounding(shape):
    """y, dx (bfloat16) within bfloat16's rounding of float64's, and no worse than XLA's formula
    (model.layer_norm); dscale and dbias, summed over rows in float32, to float32's. Rows with
    their own offsets and spreads, so a missing mean, variance or eps is seen."""
    assert native_kernel.available()
    rng = np.random.default_rng(sum(shape))
    D = shape[-1]
    x = jnp.asarray(rng.normal(size=shape) * rng.uniform(0.1, 5, size=(*shape[:-1], 1)) + rng.normal(size=(*shape[:-1], 1)),
                    jnp.bfloat16)
    scale = jnp.asarray(rng.normal(size=D), jnp.float32)
    bias = jnp.asarray(rng.normal(size=D), jnp.float32)
    dy = jnp.asarray(rng.normal(size=shape), jnp.bfloat16)
    y, pullback = jax.vjp(lambda *a: K.layer_norm(*a, M.LN_EPS), x, scale, bias)
    ours = (y, *pullback(dy))
    y, pullback = jax.vjp(lambda x, s, b: M.layer_norm(x, {"scale": s, "bias": b}, jnp.bfloat16), x, scale, bias)
    xla = (y, *pullback(dy))
    exact, sizes = exact_layer_norm(x, scale, bias, dy)
    assert [a.dtype for a in ours] == [jnp.bfloat16, jnp.bfloat16, jnp.float32, jnp.float32]
    for name, a, b, want, size, rounding in zip(("y", "dx", "dscale", "dbias"), ours, xla, exact, sizes,
                                                (2.0 ** -8, 2.0 ** -8, 1e-5, 1e-5)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert a.shape == want.shape, name
        bound = rounding * (size + 1e-3 * size.max())
        assert (np.abs(a - want) <= bound).all(), (name, np.abs(a - want).max())
        assert np.abs(a - want).max() <= 2 * np.abs(b - want).max() + 1e-6 * np.abs(want).max(), name


@needs_avx512
@pytest.mark.parametrize("shape", [(1, 16), (96, 768), (2, 32, 48)])
def test_add_layer_norm_is_the_rounded_sum_then_layer_norm_and_its_gradient_adds_the_sums(shape):
    """s is x + a rounded as XLA's bfloat16 add rounds it, y is layer_norm(s) bit for bit; x and a
    get one gradient, ds plus LayerNorm's dx to bfloat16's rounding of float64's; dscale and dbias
    are layer_norm's exactly."""
    assert native_kernel.available()
    rng = np.random.default_rng(sum(shape) + 1)
    D = shape[-1]
    x = jnp.asarray(rng.normal(size=shape) * 3 + rng.normal(size=(*shape[:-1], 1)), jnp.bfloat16)
    a = jnp.asarray(rng.normal(size=shape) * rng.uniform(0.1, 2, size=(*shape[:-1], 1)), jnp.bfloat16)
    scale, bias = (jnp.asarray(rng.normal(size=D), jnp.float32) for _ in range(2))
    ds, dy = (jnp.asarray(rng.normal(size=shape), jnp.bfloat16) for _ in range(2))
    (s, y), pullback = jax.vjp(lambda *args: K.add_layer_norm(*args, M.LN_EPS), x, a, scale, bias)
    dx, da, dscale, dbias = pullback((ds, dy))
    np.testing.assert_array_equal(np.asarray(s), np.asarray(x + a))
    ln_y, ln_pullback = jax.vjp(lambda *args: K.layer_norm(*args, M.LN_EPS), s, scale, bias)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(ln_y))
    _, want_dscale, want_dbias = ln_pullback(dy)
    np.testing.assert_array_equal(np.asarray(dscale), np.asarray(want_dscale))
    np.testing.assert_array_equal(np.asarray(dbias), np.asarray(want_dbias))
    np.testing.assert_array_equal(np.asarray(dx), np.asarray(da))
    (_, exact_dx, _, _), (_, size, _, _) = exact_layer_norm(s, scale, bias, dy)
    want = np.asarray(ds, np.float64) + exact_dx
    got = np.asarray(dx, np.float64)
    bound = 2.0 ** -8 * (np.abs(want) + size + 1e-3 * size.max())
    assert (np.abs(got - want) <= bound).all(), np.abs(got - want).max()


@needs_avx512
@pytest.mark.parametrize("N,V_pad,n_vocab", [(1, 16, 16), (5, 100, 77), (33, 1024, 1000), (8, 50304, 50257)])
def test_cross_entropy_and_its_gradient_are_float64s_over_the_real_vocabulary(N, V_pad, n_vocab):
    """Losses, logsumexp and the logits' gradient against float64: only the first n_vocab columns
    count (the padding's logits are large, so counting them is seen) and get a gradient; logits
    spread widely; a target in the last real column."""
    assert native_kernel.available()
    rng = np.random.default_rng(N + V_pad)
    logits = jnp.asarray(rng.normal(size=(N, V_pad)) * 6, jnp.float32).at[:, n_vocab:].set(30.0)
    targets = jnp.asarray(rng.integers(0, n_vocab, N), jnp.int32).at[0].set(n_vocab - 1)
    dl = jnp.asarray(rng.uniform(0.5, 2, N), jnp.float32)
    l64 = np.asarray(logits, np.float64)[:, :n_vocab]
    lse = np.log(np.exp(l64 - l64.max(-1, keepdims=True)).sum(-1)) + l64.max(-1)
    want = lse - l64[np.arange(N), np.asarray(targets)]
    grad = np.zeros((N, V_pad))
    grad[:, :n_vocab] = np.exp(l64 - lse[:, None])
    grad[np.arange(N), np.asarray(targets)] -= 1
    grad *= np.asarray(dl, np.float64)[:, None]
    losses, z = jax.jit(native_kernel.cross_entropy, static_argnums=2)(logits, targets, n_vocab)
    np.testing.assert_allclose(np.asarray(z), lse, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(losses), want, rtol=1e-5, atol=1e-5)
    losses, pullback = jax.vjp(lambda l: K.cross_entropy(l, targets, n_vocab), logits)
    got = np.asarray(pullback(dl)[0])
    np.testing.assert_allclose(got, grad, rtol=0, atol=1e-5 * np.abs(grad).max())  # lse to float32: 2^-24 of ~20
    assert not got[:, n_vocab:].any()
    nan = jax.jit(native_kernel.cross_entropy, static_argnums=2)(logits.at[0, 3].set(jnp.nan), targets, n_vocab)[0]
    assert np.isnan(np.asarray(nan)[0]) and not np.isnan(np.asarray(nan)[1:]).any()


@needs_avx512
def test_float32_training_takes_the_cross_entropy_kernel_and_matches_xla(monkeypatch):
    """A float32 gradient runs the head's cross-entropy by our kernels (one device) and equals
    XLA's to float32's rounding, the padded vocabulary included."""
    cfg = Config(n_ctx=64, n_embd=64, n_layer=2, n_head=2, n_vocab=300, precision="float32", kernels="cpu").validate()
    assert cfg.padded_vocab > cfg.n_vocab
    params = M.init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (3, 41), 0, cfg.n_vocab)
    loss = lambda p: M.token_losses(p, tokens, cfg).mean()  # noqa: E731
    assert native_kernel.CROSS_ENTROPY_BACKWARD_TARGET in jax.jit(jax.grad(loss)).lower(params).as_text()
    ours_loss, ours = jax.value_and_grad(loss)(params)
    monkeypatch.setattr(K, "native_cross_entropy", lambda *a: False)
    assert native_kernel.CROSS_ENTROPY_TARGET not in jax.jit(jax.grad(loss)).lower(params).as_text()
    xla_loss, xla = jax.value_and_grad(loss)(params)
    assert abs(float(ours_loss) - float(xla_loss)) < 1e-5
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ours), jax.tree.leaves(xla)):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * (np.abs(b).max() + 1e-12), err_msg=jax.tree_util.keystr(path))


@needs_bf16
@pytest.mark.parametrize("head_rows,kept_bytes", [(K.HEAD_GRAD_ROWS, K.KEPT_LOGITS_BYTES), (32, K.KEPT_LOGITS_BYTES),
                                                  (32, 0)])
def test_training_multiplies_by_tiles_where_the_cpu_has_them_and_agrees_with_xla(monkeypatch, head_rows, kept_bytes):
    """A bfloat16 gradient over a whole number of 32-token blocks runs the layer products, the
    attention, the LayerNorms, the head's losses and their gradients by our kernels on CPUs with AMX (by XLA elsewhere), and
    matches XLA's gradient to bfloat16's rounding of the activations; with the forward's logits
    kept for the head's gradient, and without."""
    monkeypatch.setattr(K, "HEAD_GRAD_ROWS", head_rows)  # 32: the head's gradient in two calls, summed
    monkeypatch.setattr(K, "KEPT_LOGITS_BYTES", kept_bytes)
    cfg, params, _ = bf16_model()
    tokens = jax.random.randint(jax.random.key(1), (2, 33), 0, cfg.n_vocab)  # 64 tokens: two blocks
    loss = lambda p: M.token_losses(p, tokens, cfg).mean()  # noqa: E731
    text = jax.jit(jax.grad(loss)).lower(params).as_text()
    assert (native_kernel.DENSE_BACKWARD_TARGET in text) == HAS_AMX
    assert (native_kernel.DENSE_TARGET in text) == HAS_AMX
    assert (native_kernel.HEAD_GRADS_TARGET in text) == HAS_AMX
    assert (native_kernel.HEAD_LOSSES_KEPT_TARGET in text) == (HAS_AMX and kept_bytes > 0)
    assert (native_kernel.CAUSAL_BACKWARD_TARGET in text) == HAS_AMX
    assert (native_kernel.LAYER_NORM_BACKWARD_TARGET in text) == HAS_AMX
    assert (native_kernel.ADD_LAYER_NORM_BACKWARD_TARGET in text) == HAS_AMX
    ours = jax.grad(loss)(params)
    monkeypatch.setattr(K, "native_layer_norm", lambda *a: False)
    monkeypatch.setattr(K, "native_dense", lambda *a: False)
    monkeypatch.setattr(K, "native_head_losses", lambda *a: False)
    monkeypatch.setattr(K, "native_attention_training", lambda: False)
    xla = jax.grad(loss)(params)
    xla_text = jax.jit(jax.grad(loss)).lower(params).as_text()
    assert native_kernel.DENSE_BACKWARD_TARGET not in xla_text and native_kernel.CAUSAL_BACKWARD_TARGET not in xla_text
    assert native_kernel.LAYER_NORM_BACKWARD_TARGET not in xla_text
    assert native_kernel.ADD_LAYER_NORM_BACKWARD_TARGET not in xla_text
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ours), jax.tree.leaves(xla)):
        a, b = np.asarray(a), np.asarray(b)
        scale = np.abs(b).max() + 1e-12
        assert np.abs(a - b).max() <= 0.05 * scale, (jax.tree_util.keystr(path), np.abs(a - b).max(), scale)


@needs_bf16
def test_scoring_kernels_stay_out_on_a_mesh_of_several_devices():
    """The kernels have no sharding rule (XLA would gather a sharded batch onto every device), so
    with more than one device the model evaluates on XLA alone."""
    done = run_python("""
        import jax
        from gpt2train import model as M, native_kernel
        from gpt2train.config import Config
        assert jax.device_count() == 2
        cfg = Config(n_ctx=64, n_embd=64, n_layer=2, n_head=2, n_vocab=300, precision="bfloat16", kernels="cpu").validate()
        params = M.init_params(cfg, jax.random.key(0))
        tokens = jax.random.randint(jax.random.key(1), (2, 33), 0, 300)
        text = jax.jit(lambda p: M.token_losses(p, tokens, cfg)).lower(params).as_text()
        print(any(t in text for t in (native_kernel.HEAD_LOSSES_TARGET, native_kernel.CAUSAL_TARGET, native_kernel.DENSE_TARGET)))
        """, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "False"


@needs_avx512
@pytest.mark.parametrize("shape", [(1, 1), (37, 5), (2, 3, 70, 300), (1024, 96)])
def test_transpose_is_numpys_on_the_last_two_axes(shape):
    a = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.bfloat16)
    native_kernel.available()
    t = jax.jit(native_kernel.transpose)(a)
    assert t.shape == (*shape[:-2], shape[-1], shape[-2]) and t.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(t), np.swapaxes(np.asarray(a), -1, -2))


@needs_avx512
def test_training_takes_its_kernels_on_one_device_and_not_on_a_mesh():
    """The bfloat16 train step transposes its weight gradients' operands by our kernel (on CPUs
    with AMX our kernels take those products whole) and steps Adam by it on one CPU device; on a
    mesh (no sharding rule) XLA does both."""
    program = """
        import jax, jax.numpy as jnp
        from gpt2train import native_kernel
        from gpt2train.config import Config
        from gpt2train.optimizers import make_optimizer
        from gpt2train.train import init_state, make_train_step
        cfg = Config(n_ctx=32, n_embd=64, n_layer=1, n_head=2, n_vocab=300, precision="bfloat16",
                     train_batch_size=2).validate()
        tx = make_optimizer(cfg)
        state = jax.eval_shape(lambda: init_state(cfg, tx))
        text = jax.jit(make_train_step(cfg, tx)).lower(state, jax.ShapeDtypeStruct((2, 33), jnp.int32)).as_text()
        ours = (native_kernel.TRANSPOSE_TARGET, native_kernel.DENSE_BACKWARD_TARGET, native_kernel.HEAD_GRADS_TARGET)
        print(any(t in text for t in ours), native_kernel.ADAM_TARGET in text)
        """
    for devices, want in ((1, "True True"), (2, "False False")):
        done = run_python(program, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip().splitlines()[-1] == want, devices
