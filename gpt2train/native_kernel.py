"""Our compiled CPU kernels (csrc/), built on first use into one library and called from XLA
through JAX's foreign function interface.

Decoding (csrc/decode.cc, CPUs with AVX-512):
rows_matmul       a few rows (1-16) of activations times a kernel laid out [out, in], in
                  bfloat16 (whose weights XLA:CPU streams at about half the memory's pace) or
                  float32 (whose few-row products XLA:CPU runs below the memory's pace); each pass
                  asks for the next kernel rows while it reads its own;
cached_attention  one or a few query positions against bfloat16 key/value caches, which XLA:CPU
                  converted to float32 whole at every token.

Scoring (csrc/scoring.cc and csrc/products.cc, bfloat16, without a gradient but for dense_backward;
by AMX tiles, or by vdpbf16ps on CPUs with AVX-512 BF16 alone, as `tiles` says):
dense             a layer's product of many rows, with its bias and GELU, rounded once;
dense_backward    its gradients (dx and dw) for training, where kernels.native_dense_training
                  says so (CPUs with AMX);
head_grads        the head losses' gradients for training (dx and the tied table's), the logits
                  computed again by blocks, where kernels.native_dense_training says so.
causal_attention  flash attention over blocks of 32 keys, the scores never in memory; for
                  training (CPUs with AMX), causal_attention_lse also returns each query's
                  logsumexp and causal_attention_backward computes the gradient from it;
head_losses       the tied head's token losses, the logits never in memory.

Training (csrc/optimizer.cc, csrc/layout.cc, csrc/normalization.cc and csrc/cross_entropy.cc, CPUs with
AVX-512):
adam_update       Adam's step for one float32 parameter (clip, moments, decay, learning rate)
                  in one pass over memory, in place; fused_adam.py uses it;
transpose         a transposed copy of 16-bit matrices, for the bfloat16 weight gradients;
layer_norm        LayerNorm of bfloat16 rows with each row's mean and 1 / std kept, and
                  layer_norm_backward its gradient, where kernels.native_layer_norm says so;
cross_entropy     float32 logits' token losses over the real vocabulary (one pass over each row), and
                  cross_entropy_backward their gradient, where kernels.native_cross_entropy says so.

The .cc files say why each is faster; kernels.native_rows, native_cached_attention, native_dense,
native_causal_attention and native_head_losses decide when they are used; everything else runs
on XLA.

The library is compiled with the system's C++ compiler ($CXX, else c++) for this machine's CPU
(-march=native) against the headers jaxlib ships, once, into ~/.cache/gpt2train/native (or
$XDG_CACHE_HOME/gpt2train/native), named by a hash of the source, the compiler, jaxlib's version
and the CPU, so a home shared between machines keeps one build per CPU. Without a compiler, or
if the build fails, the first use warns once and XLA runs everything. GPT2TRAIN_NATIVE_KERNEL=off never
builds or uses it. The folder holds code this program runs: compile_cache.check_private refuses
one that others can write to.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from . import compile_cache
from .errors import UserError

ENV = "GPT2TRAIN_NATIVE_KERNEL"
CSRC = os.path.join(os.path.dirname(__file__), "csrc")
SOURCES = [os.path.join(CSRC, name) for name in ("decode.cc", "scoring.cc", "products.cc", "optimizer.cc", "layout.cc",
                                                  "normalization.cc", "cross_entropy.cc")]  # compiled into one library
HEADERS = [os.path.join(CSRC, "common.h")]
TARGET = "gpt2train_rows_matmul"
ATTENTION_TARGET = "gpt2train_cached_attention"
HEAD_LOSSES_TARGET = "gpt2train_head_losses"
HEAD_LOSSES_KEPT_TARGET = "gpt2train_head_losses_kept"
CAUSAL_TARGET = "gpt2train_causal_attention"
CAUSAL_LSE_TARGET = "gpt2train_causal_attention_lse"
CAUSAL_BACKWARD_TARGET = "gpt2train_causal_attention_backward"
DENSE_TARGET = "gpt2train_dense"
DENSE_GELU_TARGET = "gpt2train_dense_gelu"
GELU_BACKWARD_TARGET = "gpt2train_gelu_backward"
DENSE_BACKWARD_TARGET = "gpt2train_dense_backward"
HEAD_GRADS_TARGET = "gpt2train_head_grads"
ADAM_TARGET = "gpt2train_adam_update"
TRANSPOSE_TARGET = "gpt2train_transpose"
LAYER_NORM_TARGET = "gpt2train_layer_norm"
LAYER_NORM_BACKWARD_TARGET = "gpt2train_layer_norm_backward"
ADD_LAYER_NORM_TARGET = "gpt2train_add_layer_norm"
ADD_LAYER_NORM_BACKWARD_TARGET = "gpt2train_add_layer_norm_backward"
CROSS_ENTROPY_TARGET = "gpt2train_cross_entropy"
CROSS_ENTROPY_BACKWARD_TARGET = "gpt2train_cross_entropy_backward"
FLAGS = ["-O3", "-march=native", "-std=c++17", "-fPIC", "-w"]  # each source to an object; "-shared" links them


def cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "gpt2train", "native")


def _cpu_identity() -> str:
    """The CPU's model name and ISA flags: what -march=native compiles for."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def _build(compiler: str) -> str:
    """Compile the library if this source, compiler, jaxlib and CPU have no build yet; its path."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    source = b""
    for name in SOURCES + HEADERS:
        with open(name, "rb") as f:
            source += f.read()
    key = hashlib.sha256(b"\0".join([source, version.encode(), jax.__version__.encode(),
                                     _cpu_identity().encode(), " ".join(FLAGS).encode()])).hexdigest()[:16]
    folder = cache_dir()
    os.makedirs(folder, exist_ok=True)
    compile_cache.check_private(folder)
    path = os.path.join(folder, f"kernels-{key}.so")
    if not os.path.exists(path):
        # Built aside, then renamed: a concurrent start or a kill never leaves half a library. The
        # sources compile side by side (9 s one after another on a 2-core Xeon, ~5 s so).
        with tempfile.TemporaryDirectory(dir=folder) as work:
            objects = [os.path.join(work, os.path.basename(name) + ".o") for name in SOURCES]
            jobs = [subprocess.Popen([compiler, *FLAGS, "-c", "-I", jax.ffi.include_dir(), name, "-o", obj],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                    for name, obj in zip(SOURCES, objects)]
            errors = [job.communicate(timeout=300)[1] for job in jobs]
            linked = None
            if not any(job.returncode for job in jobs):
                linked = subprocess.run([compiler, "-shared", *objects, "-o", os.path.join(work, "kernels.so")],
                                        capture_output=True, text=True, timeout=300)
                errors.append(linked.stderr)
            if linked is None or linked.returncode != 0:
                message = next((e.strip().splitlines()[-1] for e in errors if e.strip()), "compiler failed")
                raise RuntimeError(message)
            os.replace(os.path.join(work, "kernels.so"), path)
    return path


@functools.cache
def available() -> bool:
    """Whether the kernels can be called here: built (or found built) and registered with XLA."""
    if os.environ.get(ENV, "").strip().lower() in ("off", "0", "false", "no"):
        return False
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not compiler:
        warnings.warn("no C++ compiler (c++, g++ or clang++; or $CXX): decoding, bfloat16 evaluation and "
                      f"training's Adam step run at XLA's speed, decoding at about half of what it could; install "
                      f"one (e.g. g++), or set {ENV}=off")
        return False
    try:
        library = ctypes.cdll.LoadLibrary(_build(compiler))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.RowsMatmul), platform="cpu")
        jax.ffi.register_ffi_target(ATTENTION_TARGET, jax.ffi.pycapsule(library.CachedAttention), platform="cpu")
        jax.ffi.register_ffi_target(HEAD_LOSSES_TARGET, jax.ffi.pycapsule(library.HeadLosses), platform="cpu")
        jax.ffi.register_ffi_target(HEAD_LOSSES_KEPT_TARGET, jax.ffi.pycapsule(library.HeadLossesKept), platform="cpu")
        jax.ffi.register_ffi_target(CAUSAL_TARGET, jax.ffi.pycapsule(library.CausalAttention), platform="cpu")
        jax.ffi.register_ffi_target(CAUSAL_LSE_TARGET, jax.ffi.pycapsule(library.CausalAttentionLse), platform="cpu")
        jax.ffi.register_ffi_target(CAUSAL_BACKWARD_TARGET, jax.ffi.pycapsule(library.CausalAttentionBackward),
                                    platform="cpu")
        jax.ffi.register_ffi_target(DENSE_TARGET, jax.ffi.pycapsule(library.Dense), platform="cpu")
        jax.ffi.register_ffi_target(DENSE_GELU_TARGET, jax.ffi.pycapsule(library.DenseGelu), platform="cpu")
        jax.ffi.register_ffi_target(GELU_BACKWARD_TARGET, jax.ffi.pycapsule(library.GeluBackward), platform="cpu")
        jax.ffi.register_ffi_target(DENSE_BACKWARD_TARGET, jax.ffi.pycapsule(library.DenseBackward), platform="cpu")
        jax.ffi.register_ffi_target(HEAD_GRADS_TARGET, jax.ffi.pycapsule(library.HeadGrads), platform="cpu")
        jax.ffi.register_ffi_target(ADAM_TARGET, jax.ffi.pycapsule(library.AdamUpdate), platform="cpu")
        jax.ffi.register_ffi_target(TRANSPOSE_TARGET, jax.ffi.pycapsule(library.Transpose), platform="cpu")
        jax.ffi.register_ffi_target(CROSS_ENTROPY_TARGET, jax.ffi.pycapsule(library.CrossEntropy), platform="cpu")
        jax.ffi.register_ffi_target(CROSS_ENTROPY_BACKWARD_TARGET, jax.ffi.pycapsule(library.CrossEntropyBackward),
                                    platform="cpu")
        jax.ffi.register_ffi_target(LAYER_NORM_TARGET, jax.ffi.pycapsule(library.LayerNorm), platform="cpu")
        jax.ffi.register_ffi_target(ADD_LAYER_NORM_TARGET, jax.ffi.pycapsule(library.AddLayerNorm), platform="cpu")
        jax.ffi.register_ffi_target(ADD_LAYER_NORM_BACKWARD_TARGET, jax.ffi.pycapsule(library.AddLayerNormBackward),
                                    platform="cpu")
        jax.ffi.register_ffi_target(LAYER_NORM_BACKWARD_TARGET, jax.ffi.pycapsule(library.LayerNormBackward),
                                    platform="cpu")
    except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError, UserError) as e:
        warnings.warn(f"could not build the native kernels ({e}): decoding, evaluation and training run at XLA's speed; "
                      f"set {ENV}=off to skip the attempt")
        return False
    return True


def rows_matmul(x, w):
    """x [B, K] times w [N, K] (as w.T): [B, N] float32. Both float32, or x bfloat16 and w
    bfloat16 or its bits (uint16). Needs available()."""
    out = jax.ShapeDtypeStruct((x.shape[0], w.shape[0]), jnp.float32)
    return jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")(x, w)


def cached_attention(q, k_cache, v_cache, key_mask):
    """Decoding's attention: q [B * H, T, Dh] bfloat16 against the first S slots of the caches
    [B * H, L, Dh] (bfloat16 bits, uint16) that key_mask [B, T, S] allows. Returns [B * H, T, Dh]
    float32. Needs available()."""
    out = jax.ShapeDtypeStruct(q.shape, jnp.float32)
    return jax.ffi.ffi_call(ATTENTION_TARGET, out, vmap_method="sequential")(q, k_cache, v_cache, key_mask)


def head_losses(x, w, targets, n_vocab: int, tiles: bool):
    """Each token's cross-entropy under the tied head: x [N, K] bfloat16, w [V_pad, K] bfloat16 (or
    its bits), targets [N] int32 -> [N] float32, logsumexp over the first n_vocab rows of x . w^T
    minus the target's logit; the logits are never written out. Needs available() and AVX-512 BF16;
    tiles: by AMX (needs AMX; where the process may not use it, vdpbf16ps runs instead)."""
    out = jax.ShapeDtypeStruct((x.shape[0],), jnp.float32)
    return jax.ffi.ffi_call(HEAD_LOSSES_TARGET, out, vmap_method="sequential")(
        x, w, targets.astype(jnp.int32), n_vocab=np.int64(n_vocab), tiles=bool(tiles))


def head_losses_kept(x, w, targets, n_vocab: int, tiles: bool):
    """head_losses for training's forward: (losses [N], logsumexp [N], logits) float32, the logits
    kept for head_grads in blocks, [N / 32, ceil(n_vocab / 32), 32 tokens, 32 vocabulary rows]
    flattened to [N / 32, ...]. N a multiple of 32; otherwise as head_losses."""
    blocks = -(-n_vocab // 32)
    shapes = (jax.ShapeDtypeStruct((x.shape[0],), jnp.float32), jax.ShapeDtypeStruct((x.shape[0],), jnp.float32),
              jax.ShapeDtypeStruct((x.shape[0] // 32, blocks * 1024), jnp.float32))
    return jax.ffi.ffi_call(HEAD_LOSSES_KEPT_TARGET, shapes, vmap_method="sequential")(
        x, w, targets.astype(jnp.int32), n_vocab=np.int64(n_vocab), tiles=bool(tiles))


def causal_attention(qkv, tiles: bool):
    """Causal self-attention of qkv [B, T, 3, H, Dh] bfloat16 (Dh a multiple of 32 up to 128):
    [B, T, H, Dh] bfloat16, softmax in float32 over blocks of keys, the scores never written out.
    Needs available() and AVX-512 BF16; tiles as for head_losses."""
    B, T, _, H, Dh = qkv.shape
    out = jax.ShapeDtypeStruct((B, T, H, Dh), jnp.bfloat16)
    return jax.ffi.ffi_call(CAUSAL_TARGET, out, vmap_method="sequential")(qkv, tiles=bool(tiles))


def causal_attention_lse(qkv, tiles: bool):
    """causal_attention and each query's logsumexp of its scaled scores, [B, H, T] float32, which
    causal_attention_backward takes."""
    B, T, _, H, Dh = qkv.shape
    out = jax.ShapeDtypeStruct((B, T, H, Dh), jnp.bfloat16)
    lse = jax.ShapeDtypeStruct((B, H, T), jnp.float32)
    return jax.ffi.ffi_call(CAUSAL_LSE_TARGET, (out, lse), vmap_method="sequential")(qkv, tiles=bool(tiles))


def causal_attention_backward(qkv, out, dout, lse, tiles: bool):
    """causal_attention's gradient: qkv [B, T, 3, H, Dh], its output and the output's cotangent
    [B, T, H, Dh] (bfloat16), and causal_attention_lse's logsumexp -> dqkv [B, T, 3, H, Dh] bfloat16
    (probabilities computed again by blocks of 32 keys x 32 queries, float32 inside). Needs
    available() and AVX-512 BF16; tiles as for head_losses."""
    dqkv = jax.ShapeDtypeStruct(qkv.shape, jnp.bfloat16)
    return jax.ffi.ffi_call(CAUSAL_BACKWARD_TARGET, dqkv, vmap_method="sequential")(
        qkv, out, dout.astype(jnp.bfloat16), lse, tiles=bool(tiles))


def dense(x, w, bias, gelu: bool, tiles: bool):
    """x [N, K] bfloat16 times w [K, M] float32 plus bias [M] float32, GELU (tanh form) if asked,
    rounded once: [N, M] bfloat16. K and M multiples of 32. Needs available() and AVX-512 BF16;
    tiles as for head_losses."""
    out = jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), jnp.bfloat16)
    return jax.ffi.ffi_call(DENSE_TARGET, out, vmap_method="sequential")(x, w, bias, gelu=bool(gelu),
                                                                         tiles=bool(tiles))


def dense_gelu(x, w, bias, tiles: bool):
    """dense with GELU for training's forward: (GELU(x . w + bias), x . w + bias), both [N, M]
    bfloat16, the second for gelu_backward. As dense otherwise."""
    out = jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), jnp.bfloat16)
    return jax.ffi.ffi_call(DENSE_GELU_TARGET, (out, out), vmap_method="sequential")(x, w, bias, tiles=bool(tiles))


def gelu_backward(h, g):
    """g times GELU's (tanh form) derivative at h, both bfloat16 of one shape (a multiple of 16
    elements), in float32, rounded to bfloat16 once. Needs available() and AVX-512 BF16."""
    return jax.ffi.ffi_call(GELU_BACKWARD_TARGET, jax.ShapeDtypeStruct(h.shape, jnp.bfloat16),
                            vmap_method="sequential")(h, g.astype(jnp.bfloat16))


def dense_backward(x, w, dy, tiles: bool):
    """The gradients of dense without GELU: x [N, K] bfloat16, w [K, M] float32, dy [N, M] bfloat16
    -> (dx = dy . w^T [N, K] bfloat16, dw = x^T . dy [K, M] float32, db = dy's column sums [M]
    float32), sums in float32. N, K and M multiples of 32. Needs available() and AVX-512 BF16; tiles
    as for head_losses."""
    dx = jax.ShapeDtypeStruct(x.shape, jnp.bfloat16)
    dw = jax.ShapeDtypeStruct(w.shape, jnp.float32)
    db = jax.ShapeDtypeStruct(w.shape[1:], jnp.float32)
    return jax.ffi.ffi_call(DENSE_BACKWARD_TARGET, (dx, dw, db), vmap_method="sequential")(x, w, dy, tiles=bool(tiles))


def head_grads(x, w, targets, lse, dl, n_vocab: int, tiles: bool, logits=None):
    """The gradients of head_losses: x [N, K] bfloat16, w [V_pad, K] bfloat16, targets [N], each
    token's logsumexp lse [N] and its loss's cotangent dl [N] (float32) -> (dx [N, K] bfloat16,
    dw [V_pad, K] float32). N, K and V_pad multiples of 32. logits: head_losses_kept's for these
    tokens, or None to compute them again. Needs available() and AVX-512 BF16; tiles as for
    head_losses."""
    dx = jax.ShapeDtypeStruct(x.shape, jnp.bfloat16)
    dw = jax.ShapeDtypeStruct(w.shape, jnp.float32)
    logits = jnp.zeros((0,), jnp.float32) if logits is None else logits
    return jax.ffi.ffi_call(HEAD_GRADS_TARGET, (dx, dw), vmap_method="sequential")(
        x, w, targets.astype(jnp.int32), lse.astype(jnp.float32), dl.astype(jnp.float32), logits,
        n_vocab=np.int64(n_vocab), tiles=bool(tiles))


def layer_norm(x, scale, bias, eps: float):
    """LayerNorm over the last axis of x [..., D] bfloat16 (D a multiple of 16) with scale and bias
    [D] float32, in float32, rounded once -> (y like x, bfloat16; stats [..., 2] float32: each row's
    mean and 1 / sqrt(variance + eps)). Needs available()."""
    y = jax.ShapeDtypeStruct(x.shape, jnp.bfloat16)
    stats = jax.ShapeDtypeStruct((*x.shape[:-1], 2), jnp.float32)
    return jax.ffi.ffi_call(LAYER_NORM_TARGET, (y, stats), vmap_method="sequential")(
        x, scale.astype(jnp.float32), bias.astype(jnp.float32), eps=np.float32(eps))


def layer_norm_backward(x, scale, stats, dy):
    """layer_norm's gradients: x and dy [..., D] bfloat16, scale [D], layer_norm's stats -> (dx like x,
    dscale [D] and dbias [D] float32, summed over rows in a fixed order). Needs available()."""
    dx = jax.ShapeDtypeStruct(x.shape, jnp.bfloat16)
    d = jax.ShapeDtypeStruct(scale.shape, jnp.float32)
    return jax.ffi.ffi_call(LAYER_NORM_BACKWARD_TARGET, (dx, d, d), vmap_method="sequential")(
        x, scale.astype(jnp.float32), stats, dy.astype(jnp.bfloat16))


def add_layer_norm(x, a, scale, bias, eps: float):
    """layer_norm of s = x + a (both [..., D] bfloat16; the sum rounded to bfloat16 as XLA's add
    rounds it) -> (s, y, stats). Needs available()."""
    s = jax.ShapeDtypeStruct(x.shape, jnp.bfloat16)
    stats = jax.ShapeDtypeStruct((*x.shape[:-1], 2), jnp.float32)
    return jax.ffi.ffi_call(ADD_LAYER_NORM_TARGET, (s, s, stats), vmap_method="sequential")(
        x, a, scale.astype(jnp.float32), bias.astype(jnp.float32), eps=np.float32(eps))


def add_layer_norm_backward(s, scale, stats, dy, ds):
    """add_layer_norm's gradients: s, dy and ds (s's own cotangent) [..., D] bfloat16 -> (dx = ds +
    layer_norm's dx, rounded once, for x and a alike; dscale and dbias [D] float32). Needs available()."""
    dx = jax.ShapeDtypeStruct(s.shape, jnp.bfloat16)
    d = jax.ShapeDtypeStruct(scale.shape, jnp.float32)
    return jax.ffi.ffi_call(ADD_LAYER_NORM_BACKWARD_TARGET, (dx, d, d), vmap_method="sequential")(
        s, scale.astype(jnp.float32), stats, dy.astype(jnp.bfloat16), ds.astype(jnp.bfloat16))


def cross_entropy(logits, targets, n_vocab: int):
    """Each row's cross-entropy over the first n_vocab of logits [N, V_pad] float32 against targets
    [N] -> (losses [N], logsumexp [N]) float32; a NaN logit gives NaN. Needs available()."""
    out = jax.ShapeDtypeStruct(logits.shape[:1], jnp.float32)
    return jax.ffi.ffi_call(CROSS_ENTROPY_TARGET, (out, out), vmap_method="sequential")(
        logits, targets.astype(jnp.int32), n_vocab=np.int64(n_vocab))


def cross_entropy_backward(logits, targets, lse, dl, n_vocab: int):
    """cross_entropy's gradient: (softmax over the first n_vocab columns - one-hot(target)) * dl, zero
    past n_vocab, [N, V_pad] float32. Needs available()."""
    out = jax.ShapeDtypeStruct(logits.shape, jnp.float32)
    return jax.ffi.ffi_call(CROSS_ENTROPY_BACKWARD_TARGET, out, vmap_method="sequential")(
        logits, targets.astype(jnp.int32), lse, dl.astype(jnp.float32), n_vocab=np.int64(n_vocab))


def adam_update(g, m, v, p, scalars, *, b1: float, b2: float, eps: float, decay: float):
    """Adam's step for one float32 parameter, in place: g, m, v, p of one shape, scalars [4] float32
    (divisor of g, -lr, bias corrections 1 - b1^t and 1 - b2^t) -> new (m, v, p), which take m's,
    v's and p's buffers (donate them). Needs available()."""
    out = jax.ShapeDtypeStruct(p.shape, jnp.float32)
    return jax.ffi.ffi_call(ADAM_TARGET, (out, out, out), vmap_method="sequential",
                            input_output_aliases={1: 0, 2: 1, 3: 2})(
        g, m, v, p, scalars, b1=np.float32(b1), one_minus_b1=np.float32(1 - b1), b2=np.float32(b2),
        one_minus_b2=np.float32(1 - b2), eps=np.float32(eps), decay=np.float32(decay))


def transpose(a):
    """a [..., R, C] of a 16-bit dtype (bfloat16) -> [..., C, R], a new array XLA cannot fold
    back into the product that reads it. Needs available()."""
    out = jax.ShapeDtypeStruct((*a.shape[:-2], a.shape[-1], a.shape[-2]), a.dtype)
    return jax.ffi.ffi_call(TRANSPOSE_TARGET, out, vmap_method="sequential")(a)
