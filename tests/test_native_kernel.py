"""Our compiled CPU kernels (native_kernel.py, csrc/decode.cc): built on first use, the same
products and attention as XLA's, used exactly where kernels says, and a clear fallback without them.

The kernels need AVX-512 bfloat16; on a CPU without it the tests that run them are skipped and the
fallback tests still run (decoding then never asks for them)."""

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


def exact_product(x, w):
    """x . w.T in float64 from the inputs' values: what float32 accumulation approximates."""
    return np.asarray(x, np.float64) @ np.asarray(w, np.float64).T


@pytest.mark.parametrize("dtype", [
    pytest.param(jnp.bfloat16, marks=needs_bf16), pytest.param(jnp.float32, marks=needs_avx512)])
@pytest.mark.parametrize("rows,k,n", [(1, 768, 2304), (2, 3072, 768), (1, 100, 7), (2, 37, 33), (11, 64, 50),
                                      (2, 768, 50304), (16, 3072, 200), (5, 96, 40)])
def test_rows_matmul_is_the_product_at_any_shape(rows, k, n, dtype):
    """Columns split over threads; kernel rows in pairs (an odd one left), K not a multiple of the
    vector step (masked tail), more rows than one pass takes (11 = 8 + 3); bfloat16 by vdpbf16ps,
    and on AMX CPUs 2-16 rows by tiles, in blocks of 16 kernel rows, the rest by vdpbf16ps;
    float32 by FMA."""
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
    assert uses_kernel(x4, w, transposed=True) == ("amx_bf16" in K.cpu_flags())  # by AMX; else XLA is faster
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
    assert len(built) == 1 and built[0].name.startswith("decode-") and built[0].suffix == ".so"


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
