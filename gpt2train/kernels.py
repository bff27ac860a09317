"""The model's matrix products and causal attention, in two implementations (config key `kernels`).

standard  what JAX offers every backend: `jax.nn.dot_product_attention` (fused cuDNN/XLA
          kernels on GPU and TPU) and plain products accumulated in float32, differentiated
          by JAX's automatic differentiation.
cpu       kernels written for XLA:CPU, each for the measured reason given where it is defined:
          causal attention by blocks of query rows with its own backward, bfloat16
          products with their own backward that keeps every product in bfloat16, and
          decoding's products of a few rows (bfloat16 and float32) and its attention over
          bfloat16 caches by our compiled kernels (native_kernel.py) on CPUs with AVX-512, and,
          on CPUs with AVX-512 BF16 or AMX, bfloat16 work without a gradient (evaluation, task
          scoring): layer products, causal attention and the head's losses, by our kernels too;
          on CPUs with AMX the layer products, the causal attention and the head's losses
          under a gradient as well (native_dense_training, native_attention_training), and
          LayerNorm with its gradient (native_layer_norm). In training on one AVX-512 CPU
          device, the weight gradients' transposed bfloat16 operands are copied by our kernel
          (native_transpose), float32's cross-entropy over the head's logits runs on ours
          (native_cross_entropy), and Adam steps by fused_adam.
auto      `cpu` when JAX's default backend is the CPU, else `standard`.

Both compute the same function; tests/test_kernels.py holds them to the same values and gradients.
The public surface is `resolve`, `matmul` and `causal_attention` (each takes any of the three
names), and the native_* predicates the model asks before taking a kernel of ours.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from . import native_kernel

IMPLS = ("cpu", "standard")
BF16_BITS = jnp.uint16  # a bfloat16 array held as its bits (see matmul and model.laid_out_for)
NATIVE_ROWS = 16  # rows up to which a bfloat16 product may go to our compiled kernel (native_rows)


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The ISA flags /proc/cpuinfo lists for this machine's CPU (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def decode_transposed(rows: int, dtype=jnp.float32) -> bool:
    """Whether decoding `rows` texts at once, in dtype, reads layer kernels as [out, in]
    (model.decode_params).

    One row does everywhere: XLA:CPU's matrix-vector product streams that layout faster, and the
    native kernel (native_rows) reads it. Several rows do on CPUs with AMX, where XLA:CPU's
    products of a few rows by [out, in] kernels are faster too (124M, batch 8, on an Intel Xeon
    with AMX: bfloat16 209 against 166 tok/s, float32 132 against 121); on the AVX-512 AMD EPYC
    [in, out] was the faster one for several rows, unless the native kernel takes them."""
    return (rows == 1 or (jax.default_backend() == "cpu" and "amx_bf16" in cpu_flags())
            or native_rows(rows, dtype))


def native_rows(rows: int, dtype) -> bool:
    """Whether a product of `rows` rows in dtype by an [out, in] kernel goes to
    native_kernel.rows_matmul, which reads the weights near the memory's pace where XLA:CPU does
    not (124M's 12 layers and head chained, Intel Xeon with AMX):

    bfloat16  on CPUs with AVX-512 bfloat16, up to NATIVE_ROWS rows. XLA:CPU streams bfloat16
              weights as float32 for one row and packs them for several: 1 row 10.1 ms against
              20 for XLA's float32 and 49 for its bfloat16; 8 rows 10.3 against 17.8; 16 rows 11.7
              against 19.0 (by AMX). Without AMX, several rows share each vdpbf16ps's lanes
              (decode.cc, columns_lanes): the head's [50304, 768] at 8 rows 2.6 ms against XLA's
              13.2, at 16 rows 4.0 against 14.5 (AMD EPYC, Zen 5).
    float32   on CPUs with AVX-512, up to NATIVE_ROWS rows: 1 row 15.8 ms against 18.2, 2 rows
              17.6 against 31.2, 8 rows 28.1 against 36.6, 16 rows 35.5 against 40.8."""
    if jax.default_backend() != "cpu" or rows > NATIVE_ROWS:
        return False
    flags = cpu_flags()
    if jnp.dtype(dtype) == jnp.bfloat16:
        usable = "avx512_bf16" in flags
    else:
        usable = jnp.dtype(dtype) == jnp.float32 and {"avx512f", "avx512bw"} <= flags
    return usable and native_kernel.available()


AVX512 = frozenset({"avx512f", "avx512bw"})


def native_on_one_device(flags: frozenset = AVX512) -> bool:
    """Whether kernels that see whole arrays can run: the CPU backend with one device (they have
    no sharding rule, so on a mesh XLA would gather sharded operands onto every device and run
    the whole call on each), a CPU with `flags`, and the library built."""
    return (jax.default_backend() == "cpu" and jax.device_count() == 1 and flags <= cpu_flags()
            and native_kernel.available())


def native_transpose() -> bool:
    """Whether bfloat16 weight gradients transpose their left operand by native_kernel.transpose
    (_outer_product_sum)."""
    return native_on_one_device()


def native_cached_attention(impl: str) -> bool:
    """Whether decoding's attention over bfloat16 caches goes to native_kernel.cached_attention
    (CPUs with AVX-512 bfloat16, `kernels` cpu). XLA:CPU multiplies each head's single query row
    in float32, so it converted every cache it read to float32 at every token (124M, batch 8:
    12.4 of a 30.6 ms step); the kernel reads the caches' bfloat16 as they lie."""
    return (resolve(impl) == "cpu" and "avx512_bf16" in cpu_flags() and native_kernel.available())


def _scoring_kernels_usable() -> bool:
    """AVX-512 BF16 (every CPU with AMX has it) on one device (native_on_one_device)."""
    return native_on_one_device(frozenset({"avx512_bf16"}))


def scoring_tiles() -> bool:
    """Whether the scoring kernels multiply by AMX tiles (CPUs that have them: Intel Xeon) or by
    vdpbf16ps (AVX-512 BF16 alone: AMD EPYC). Each kernel's loops are ordered for its way."""
    return {"amx_bf16", "amx_tile"} <= cpu_flags()


def native_dense(x, w, impl: str) -> bool:
    """Whether a layer's product x [N, K] (bfloat16) . w [K, M] (float32) + bias goes to
    native_kernel.dense when no gradient is taken (CPUs with AVX-512 BF16 or AMX, `kernels` cpu,
    K and M multiples of 32): XLA:CPU ran these products at about 1.0 TFLOP/s and c_fc's GELU as a
    pass of its own (124M evaluation at 8 x 1024 on an Intel Xeon with AMX: c_fc and GELU 65 ms a
    layer, the kernel 30; c_attn 35 against 21; on an AMD EPYC (Zen 5) by vdpbf16ps: c_fc and
    GELU 49 against 67, c_attn 43 against 47, c_proj of the MLP 47 against 64). Under a gradient
    the reference runs (dense)."""
    return (resolve(impl) == "cpu" and x.dtype == jnp.bfloat16 and w.dtype == jnp.float32 and x.ndim == 2
            and w.ndim == 2 and x.shape[1] % 32 == 0 and w.shape[1] % 32 == 0 and _scoring_kernels_usable())


def native_dense_training(x) -> bool:
    """Whether, under a gradient too, a product native_dense takes (x [N, K]) runs on our kernels:
    forward by native_kernel.dense and both gradient products by native_kernel.dense_backward; and
    the head's losses native_head_losses takes by head_losses and head_grads (CPUs with AMX, N a
    multiple of 32). XLA:CPU's bfloat16 products ran well below AMX's pace at the training step's
    shapes (124M at 4 x 256, Intel Xeon with AMX: a step of 1,617 ms, 1,342 so); on AVX-512 BF16
    alone (AMD EPYC) XLA's are as fast as ours, so XLA keeps them there."""
    return scoring_tiles() and x.shape[0] % 32 == 0


def gelu(y):
    """GELU (tanh form) in float32, rounded to y's dtype once: in bfloat16 XLA:CPU rounded after
    each of its eight operations (124M evaluation at 8 x 1024, Intel Xeon with AMX: 33 ms a layer,
    now 20)."""
    return jax.nn.gelu(y.astype(jnp.float32), approximate=True).astype(y.dtype)


def dense(x, w, bias, with_gelu: bool, reference):
    """native_kernel.dense where native_dense says so. Under a gradient, where
    native_dense_training says so, our kernels compute the product, GELU and their gradients;
    elsewhere reference(x, w, bias) -- the same product by XLA --
    computes both, so training's step is as it was."""
    if native_dense_training(x):
        return _trained_dense(x, w, bias, with_gelu)
    native = functools.partial(native_kernel.dense, gelu=with_gelu, tiles=scoring_tiles())
    return _native_unless_differentiated(native, reference, x, w, bias)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _trained_dense(x, w, bias, with_gelu: bool):
    """(x . w + bias) rounded to bfloat16, through GELU if asked, in one pass (GELU applied in
    float32 before rounding), under a gradient too (keeping the pre-activation, rounded)."""
    return native_kernel.dense(x, w, bias, gelu=with_gelu, tiles=True)


def _trained_dense_fwd(x, w, bias, with_gelu):
    if not with_gelu:
        return native_kernel.dense(x, w, bias, gelu=False, tiles=True), (x, w, None)
    # GELU in the product's pass, keeping the pre-activation for its gradient (native_kernel.dense_gelu,
    # gelu_backward): XLA's GELU under jax.vjp wrote its tanh out in float32 and read it back twice
    # (124M at 4 x 256, Intel Xeon with AMX: its three passes 55-80 ms of the step; gelu_backward
    # takes 16, and GELU adds ~9 to c_fc's products).
    y, h = native_kernel.dense_gelu(x, w, bias, tiles=True)
    return y, (x, w, h)


def _trained_dense_bwd(with_gelu, residuals, g):
    x, w, h = residuals
    gh = native_kernel.gelu_backward(h, g) if with_gelu else g
    return native_kernel.dense_backward(x, w, gh.astype(jnp.bfloat16), tiles=True)


_trained_dense.defvjp(_trained_dense_fwd, _trained_dense_bwd)


def native_layer_norm(x, impl: str) -> bool:
    """Whether LayerNorm of a bfloat16 x [..., D] runs on native_kernel.layer_norm, and its gradient
    on layer_norm_backward: where the layer products train on our kernels (CPUs with AMX, rows a
    multiple of 32, as native_dense_training), D a multiple of 16. XLA:CPU's LayerNorm and its
    gradient took 8-9 passes and reductions over the rows, the scale's and bias's gradients summed
    over tokens on one thread (124M bfloat16 step at 4 x 256, Intel Xeon with AMX: about 0.1 s);
    here each is one pass. Untried on AVX-512 BF16 alone (AMD EPYC), so XLA keeps it there."""
    return (resolve(impl) == "cpu" and x.dtype == jnp.bfloat16 and x.ndim >= 2 and x.shape[-1] % 16 == 0
            and math.prod(x.shape[:-1]) % 32 == 0 and _scoring_kernels_usable() and scoring_tiles())


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x, scale, bias, eps: float):
    """LayerNorm of x [..., D] (bfloat16, where native_layer_norm says so) in float32, rounded to
    bfloat16 once, by our kernels forward and backward."""
    return native_kernel.layer_norm(x, scale, bias, eps)[0]


def _layer_norm_fwd(x, scale, bias, eps):
    y, stats = native_kernel.layer_norm(x, scale, bias, eps)
    return y, (x, scale, stats)


def _layer_norm_bwd(eps, residuals, dy):
    x, scale, stats = residuals
    dx, dscale, dbias = native_kernel.layer_norm_backward(x, scale, stats, dy)
    return dx, dscale.astype(scale.dtype), dbias.astype(scale.dtype)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def add_layer_norm(x, a, scale, bias, eps: float):
    """(s, LayerNorm(s)) for s = x + a, bfloat16: a block's residual branch added to the stream and
    the next LayerNorm, one pass by our kernel each way (where native_layer_norm says so for x)."""
    s, y, _ = native_kernel.add_layer_norm(x, a, scale, bias, eps)
    return s, y


def _add_layer_norm_fwd(x, a, scale, bias, eps):
    s, y, stats = native_kernel.add_layer_norm(x, a, scale, bias, eps)
    return (s, y), (s, scale, stats)


def _add_layer_norm_bwd(eps, residuals, cotangents):
    s, scale, stats = residuals
    ds, dy = cotangents
    dx, dscale, dbias = native_kernel.add_layer_norm_backward(s, scale, stats, dy, ds)
    return dx, dx, dscale.astype(scale.dtype), dbias.astype(scale.dtype)


add_layer_norm.defvjp(_add_layer_norm_fwd, _add_layer_norm_bwd)


def native_cross_entropy(x, impl: str) -> bool:
    """Whether the head's cross-entropy over its float32 logits, for x [N, D] float32 (float32
    compute), runs on native_kernel.cross_entropy and its gradient on cross_entropy_backward
    (`kernels` cpu, CPUs with AVX-512, one device). XLA:CPU made five passes over the [N, V_pad]
    logits where these make one each way (the small training shape, 768 tokens of a 50,257
    vocabulary, Intel Xeon: ~75 ms of a ~235 ms step). The same exponential runs in the scoring
    kernels on AMD EPYC (Zen 5) and Intel Xeon alike."""
    return resolve(impl) == "cpu" and x.dtype == jnp.float32 and x.ndim == 2 and native_on_one_device()


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def cross_entropy(logits, targets, n_vocab: int):
    """Token losses [N] of float32 logits [N, V_pad] (unmasked: only the first n_vocab columns
    count) by our kernels, forward and backward (native_cross_entropy)."""
    return native_kernel.cross_entropy(logits, targets, n_vocab)[0]


def _cross_entropy_fwd(logits, targets, n_vocab):
    losses, lse = native_kernel.cross_entropy(logits, targets, n_vocab)
    return losses, (logits, targets, lse)


def _cross_entropy_bwd(n_vocab, residuals, dl):
    logits, targets, lse = residuals
    return native_kernel.cross_entropy_backward(logits, targets, lse, dl, n_vocab), None


cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)


def native_head_losses(x, w, n_vocab: int, impl: str) -> bool:
    """Whether the tied head's token losses of a bfloat16 x [N, K] under w [V_pad, K] go to
    native_kernel.head_losses (CPUs with AVX-512 BF16 or AMX, `kernels` cpu): XLA:CPU wrote the
    float32 logits out and read them back for the mask, the maximum, the sum and the target (124M
    evaluation at 8 x 1024 on an Intel Xeon with AMX: 2.2 of a 4.4 s step; the kernel's head takes
    0.5; on an AMD EPYC, Zen 5, 2,048 tokens' head 189 ms against XLA's 277). Under a gradient
    only where native_dense_training says so (head_losses)."""
    return (resolve(impl) == "cpu" and x.dtype == jnp.bfloat16 and x.ndim == 2 and x.shape[1] % 32 == 0
            and -(-n_vocab // 32) * 32 <= w.shape[0] and _scoring_kernels_usable())


def head_losses(x, w, targets, n_vocab: int, reference):
    """Token losses [N] by native_kernel.head_losses, where native_head_losses says so. Under a
    gradient, where native_dense_training says so (and the padded table is whole blocks of 32
    rows), native_kernel.head_grads computes their gradient; elsewhere reference(x, w, targets) --
    the same losses by XLA -- computes them and their gradient."""
    if native_dense_training(x) and w.shape[0] % 32 == 0:
        return _trained_head_losses(x, w, targets, n_vocab)
    native = lambda x, w, targets: native_kernel.head_losses(  # noqa: E731
        x, w.astype(jnp.bfloat16), targets, n_vocab, tiles=scoring_tiles())
    return _native_unless_differentiated(native, reference, x, w, targets)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _trained_head_losses(x, w, targets, n_vocab: int):
    """head_losses by our kernels, with their gradient by native_kernel.head_grads (CPUs with AMX)."""
    return native_kernel.head_losses(x, w.astype(jnp.bfloat16), targets, n_vocab, tiles=True)


# The forward keeps its float32 logits for the backward up to this size (1,024 tokens at GPT-2's
# vocabulary: 206 MB), which then reads them rather than multiply x . w^T again: 124M's head at
# 1,024 tokens on an Intel Xeon with AMX, backward 178 -> 142-147 ms, forward 42 -> 56; the whole
# step 870 -> 842 ms. Past it (8 x 1,024 tokens would keep 1.6 GB) the backward computes them again.
KEPT_LOGITS_BYTES = 512 << 20


def _trained_head_losses_fwd(x, w, targets, n_vocab):
    wc = w.astype(jnp.bfloat16)
    if x.shape[0] * -(-n_vocab // 32) * 32 * 4 <= KEPT_LOGITS_BYTES:
        losses, lse, logits = native_kernel.head_losses_kept(x, wc, targets, n_vocab, tiles=True)
        return losses, (x, wc, targets, lse, logits)
    losses = native_kernel.head_losses(x, wc, targets, n_vocab, tiles=True)
    # Each token's logsumexp is its loss plus its target's logit (one row's product, by XLA).
    picked = jnp.sum(x.astype(jnp.float32) * wc[targets].astype(jnp.float32), axis=-1)
    return losses, (x, wc, targets, losses + picked, None)


HEAD_GRAD_ROWS = 2048  # tokens per head_grads call: its logit gradients take 4 bytes per token and vocabulary row


def _trained_head_losses_bwd(n_vocab, residuals, g):
    x, wc, targets, lse, logits = residuals
    dxs, dw = [], None
    for start in range(0, x.shape[0], HEAD_GRAD_ROWS):  # ~0.4 GB of logit gradients at GPT-2's vocabulary
        rows = slice(start, start + HEAD_GRAD_ROWS)
        kept = None if logits is None else logits[start // 32:(start + HEAD_GRAD_ROWS) // 32]
        dx, dw_part = native_kernel.head_grads(x[rows], wc, targets[rows], lse[rows], g[rows], n_vocab, tiles=True,
                                               logits=kept)
        dxs.append(dx)
        dw = dw_part if dw is None else dw + dw_part
    return jnp.concatenate(dxs), dw, None


_trained_head_losses.defvjp(_trained_head_losses_fwd, _trained_head_losses_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _native_unless_differentiated(native, reference, *args):
    """native(*args), a compiled kernel's value; under a gradient reference(*args) -- the same
    function by XLA -- computes both the value and the gradient (the kernels have no backward)."""
    return native(*args)


_native_unless_differentiated.defvjp(lambda native, reference, *args: jax.vjp(reference, *args),
                                     lambda native, reference, pullback, g: pullback(g))


def native_causal_attention(qkv) -> bool:
    """Whether causal attention over a bfloat16 qkv [B, T, 3, H, Dh] (`kernels` cpu) goes to
    native_kernel.causal_attention when no gradient is taken (CPUs with AVX-512 BF16 or AMX, Dh a
    multiple of 32 up to 128): XLA:CPU wrote every block's float32 scores out between the product
    and the softmax and converted q, k and v to float32 on the way (124M evaluation at 8 x 1024 on
    an Intel Xeon with AMX: 95 ms a layer; the kernel's flash attention, blocks of 32 keys with a
    running maximum, 27; on an AMD EPYC, Zen 5, by vdpbf16ps: 27 against 82-90). Under a gradient
    _attend_causal's own forward and backward run, except where native_attention_training says so."""
    Dh = qkv.shape[-1]
    return qkv.dtype == jnp.bfloat16 and Dh % 32 == 0 and Dh <= 128 and _scoring_kernels_usable()


def cached_attention(q, k_cache, v_cache, key_mask):
    """native_kernel.cached_attention, where native_cached_attention says so."""
    return native_kernel.cached_attention(q, k_cache, v_cache, key_mask)


def resolve(impl: str) -> str:
    """The implementation a `kernels` value stands for: "cpu" or "standard"."""
    if impl == "auto":
        return "cpu" if jax.default_backend() == "cpu" else "standard"
    if impl not in IMPLS:
        raise ValueError(f"kernels must be one of {('auto',) + IMPLS}, got {impl!r}")
    return impl


def matmul(x, w, *, transposed: bool = False, impl: str, decoding: bool = False):
    """x [N, K] times the kernel w -- [K, M], or [M, K] with transposed -- cast to x's dtype.
    Returns float32 [N, M], accumulated in float32. decoding: a decode step's product, which
    may go to the compiled kernel (native_rows); training and evaluation never do. A uint16 w
    (BF16_BITS, decoding only: no gradient) holds bfloat16 bits."""
    native = decoding and transposed and resolve(impl) == "cpu"
    if w.dtype == BF16_BITS:
        if native and native_rows(x.shape[0], jnp.bfloat16):
            return native_kernel.rows_matmul(x.astype(jnp.bfloat16), w)
        w = jax.lax.bitcast_convert_type(w, jnp.bfloat16)
    if native and x.dtype in (jnp.bfloat16, jnp.float32) and native_rows(x.shape[0], x.dtype):
        return _native_matmul(x, w.astype(x.dtype))
    if resolve(impl) == "cpu" and x.dtype == jnp.bfloat16:
        return _low_precision_matmul(x, w, transposed)
    return _contract(x, w.astype(x.dtype), 1, 1 if transposed else 0)


def causal_attention(qkv, impl: str):
    """Causal self-attention on the stacked qkv [B, T, 3, H, Dh] as c_attn produces it: [B, T, H, Dh]
    in qkv's dtype (scores and softmax in float32)."""
    if resolve(impl) == "cpu":
        if native_causal_attention(qkv):
            if native_attention_training():
                return _trained_attention(qkv)
            native = functools.partial(native_kernel.causal_attention, tiles=scoring_tiles())
            return _native_unless_differentiated(native, _attend_causal, qkv)
        return _attend_causal(qkv)
    return jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], is_causal=True)


def native_attention_training() -> bool:
    """Whether, under a gradient too, causal attention native_causal_attention takes runs on our
    kernels: forward by native_kernel.causal_attention_lse, backward by causal_attention_backward
    (CPUs with AMX, as native_dense_training). XLA:CPU's blocks wrote their float32 scores,
    probabilities and their gradients out between its batched products (124M at 4 x 256, Intel
    Xeon with AMX: a layer's attention, forward and backward, 11-12 ms; ours 3.9). On AVX-512 BF16
    alone (AMD EPYC) the kernels are the same, by vdpbf16ps, but not yet measured in training, so
    XLA keeps attention's gradient there."""
    return scoring_tiles()


@jax.custom_vjp
def _trained_attention(qkv):
    """native_kernel.causal_attention, with its gradient by native_kernel.causal_attention_backward."""
    return native_kernel.causal_attention(qkv, tiles=True)


def _trained_attention_fwd(qkv):
    out, lse = native_kernel.causal_attention_lse(qkv, tiles=True)
    return out, (qkv, out, lse)


def _trained_attention_bwd(residuals, g):
    qkv, out, lse = residuals
    return (native_kernel.causal_attention_backward(qkv, out, g, lse, tiles=True),)


_trained_attention.defvjp(_trained_attention_fwd, _trained_attention_bwd)


# ----------------------------------------------------------------------------- cpu: products
def _contract(a, b, a_axis: int, b_axis: int):
    return jax.lax.dot_general(a, b, (((a_axis,), (b_axis,)), ((), ())), preferred_element_type=jnp.float32)


def _outer_product_sum(a, b):
    """a^T b over the M axis: a [..., M, P], b [..., M, Q] -> [..., P, Q], accumulated in float32.

    XLA:CPU runs a bfloat16 product natively only when its left operand contracts over its
    last axis; a plain transposed copy of `a` is folded back into the product by XLA (after
    the pass that would have kept it in bfloat16), leaving a float32 product or one some
    shapes cannot run. So in bfloat16 the M rows are visited in another order -- (M/2, 2)
    instead of (2, M/2) -- in both operands: not a transpose XLA can fold, and the same sum.
    Other dtypes, and an odd M, multiply in float32.

    For the layers' weight gradients (2-D operands), where native_transpose says so, `a` is
    transposed by our kernel instead, whose result XLA cannot fold back, and b is read as it lies:
    XLA:CPU's reordering copies of bfloat16 were slow (124M, 4 x 256 tokens, AMD EPYC Zen 5:
    c_proj's [1024, 3072] 3.4 ms, ours 0.9; its weight gradient 9.5 ms, 6.0 so; the head's 128
    ms, 114). Attention's batched
    products keep the reordering: with one block of queries XLA fused the transposed copy into a
    float32 product."""
    *lead, M, P = a.shape
    if a.dtype == jnp.bfloat16 and not lead and native_transpose():
        return jnp.einsum("pm,mq->pq", native_kernel.transpose(a), b, preferred_element_type=jnp.float32)
    if a.dtype != jnp.bfloat16 or M % 2:
        return jnp.einsum("...mp,...mq->...pq", a.astype(jnp.float32), b.astype(jnp.float32))
    n, Q = len(lead), b.shape[-1]
    at = a.reshape(*lead, 2, M // 2, P).transpose(*range(n), n + 2, n + 1, n).reshape(*lead, P, M)
    bp = b.reshape(*lead, 2, M // 2, Q).transpose(*range(n), n + 1, n, n + 2).reshape(*lead, M, Q)
    return jnp.einsum("...pm,...mq->...pq", at, bp, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _low_precision_matmul(x, w, transposed: bool = False):
    """matmul for a bfloat16 x, with its own gradient so that both gradient products run in
    bfloat16 too: automatic differentiation multiplies the float32 output's cotangent by the
    bfloat16 kernel, which promotes those products to float32."""
    return _low_precision_matmul_fwd(x, w, transposed)[0]


def _low_precision_matmul_fwd(x, w, transposed):
    wc = w.astype(x.dtype)
    return _contract(x, wc, 1, 1 if transposed else 0), (x, wc)


def _low_precision_matmul_bwd(transposed, residuals, g):
    x, wc = residuals
    gc = g.astype(x.dtype)
    dx = _contract(gc, wc, 1, 0 if transposed else 1)
    dw = _outer_product_sum(gc, x) if transposed else _outer_product_sum(x, gc)
    return dx.astype(x.dtype), dw


_low_precision_matmul.defvjp(_low_precision_matmul_fwd, _low_precision_matmul_bwd)


@jax.custom_vjp
def _native_matmul(x, w):
    """x [B, K] times w [N, K] as w.T through native_kernel.rows_matmul (decoding); its gradient,
    should one be taken, by XLA's products."""
    return native_kernel.rows_matmul(x, w)


def _native_matmul_fwd(x, w):
    return native_kernel.rows_matmul(x, w), (x, w)


def _native_matmul_bwd(residuals, g):
    x, w = residuals
    g = g.astype(x.dtype)
    return _contract(g, w, 1, 0).astype(x.dtype), _contract(g, x, 0, 0).astype(w.dtype)


_native_matmul.defvjp(_native_matmul_fwd, _native_matmul_bwd)


# ----------------------------------------------------------------------------- cpu: attention
ATTN_BLOCK = 128  # query rows per block in _attend_causal
ROW_BY_ROW_SCORE_BYTES = 64 * 2**20  # above this, attention without a gradient goes row by row


def _causal_blocks(T: int, block: int):
    return [(start, min(start + block, T)) for start in range(0, T, block)]


def _block_probs(qh, kh, start: int, end: int):
    """Softmax probabilities [B, H, end - start, end] of query rows start..end-1 (float32)."""
    s = jnp.einsum("...qd,...kd->...qk", qh[..., start:end, :], kh[..., :end, :], preferred_element_type=jnp.float32)
    visible = jnp.arange(end)[None, :] <= jnp.arange(start, end)[:, None]
    return jax.nn.softmax(jnp.where(visible, s / math.sqrt(qh.shape[-1]), -jnp.inf), axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _attend_causal(qkv, block: int = ATTN_BLOCK):
    """causal_attention by blocks of query rows, each against only the keys it may see.

    A full [T, T] score matrix computes and then masks away the upper triangle: half the
    score and value products and half the softmax memory traffic. Query block i needs only
    keys [0, (i+1) * block), which skips ~44% of that work at 8 blocks (measured on CPU at
    8 x 1024 x 12 heads: 0.31 s per layer against 0.64 s for the fused full-matrix kernel).

    qkv is moved to head-major [3, B, H, T, Dh] by one transpose, so that every product (forward
    and backward) has its batch axes first and its operands in the layouts XLA:CPU multiplies
    natively in bfloat16; the backward is written out for the same reason (autodiff left it in
    float32, with the layout changes scattered through slow loops), and its gradient goes back
    to qkv's layout by one transpose too.

    Without a gradient (evaluation, scoring), a batch whose scores would be large is visited one
    row at a time: a row's score blocks stay in the CPU's caches between the product that writes
    them and the softmax that reads them (measured on an Intel Xeon with AMX, 124M evaluation at
    8 x 1024: 12% more tokens/s in bfloat16, 7% in float32; at 4 x 256, whose scores fit in the
    caches anyway, 5% fewer, so small batches stay whole)."""
    qh, kh, vh = qkv.transpose(2, 0, 3, 1, 4)
    B, H, T, _ = qh.shape
    if B > 1 and B * H * T * T * 2 > ROW_BY_ROW_SCORE_BYTES:  # float32 scores of the causal half
        out = jax.lax.map(lambda row: _causal_rows(*row, block)[0], (qh, kh, vh))
    else:
        out = _causal_rows(qh, kh, vh, block)[0]
    return out.astype(vh.dtype).transpose(0, 2, 1, 3)


def _causal_rows(qh, kh, vh, block):
    """Attention outputs [..., T, Dh] (float32) of head-major q, k, v [..., T, Dh], by query
    blocks, and each block's probabilities (in v's dtype)."""
    outs, probs = [], []
    for start, end in _causal_blocks(qh.shape[-2], block):
        p = _block_probs(qh, kh, start, end).astype(vh.dtype)
        outs.append(jnp.einsum("...qk,...kd->...qd", p, vh[..., :end, :], preferred_element_type=jnp.float32))
        probs.append(p)
    return jnp.concatenate(outs, axis=-2), probs


def _attend_causal_fwd(qkv, block):
    qh, kh, vh = qkv.transpose(2, 0, 3, 1, 4)
    out, probs = _causal_rows(qh, kh, vh, block)
    return out.astype(vh.dtype).transpose(0, 2, 1, 3), (qh, kh, vh, probs)


def _attend_causal_bwd(block, residuals, g):
    qh, kh, vh, probs = residuals
    dtype, (B, H, T, Dh) = vh.dtype, vh.shape
    gh = g.astype(dtype).transpose(0, 2, 1, 3)
    dq, dk, dv = [], jnp.zeros((B, H, T, Dh), jnp.float32), jnp.zeros((B, H, T, Dh), jnp.float32)
    for (start, end), p in zip(_causal_blocks(T, block), probs):
        g_blk = gh[:, :, start:end]
        dp = jnp.einsum("bhqd,bhkd->bhqk", g_blk, vh[:, :, :end], preferred_element_type=jnp.float32)
        pf = p.astype(jnp.float32)
        ds = (pf * (dp - jnp.sum(dp * pf, axis=-1, keepdims=True)) / math.sqrt(Dh)).astype(dtype)
        dq.append(jnp.einsum("bhqk,bhkd->bhqd", ds, kh[:, :, :end], preferred_element_type=jnp.float32).astype(dtype))
        dk = dk.at[:, :, :end].add(_outer_product_sum(ds, qh[:, :, start:end]))
        dv = dv.at[:, :, :end].add(_outer_product_sum(p, g_blk))
    # Each part to [B, T, H, Dh], then stacked: one transposed stack of [3, B, H, T, Dh] was a
    # 5-D copy XLA:CPU ran slowly (124M at 4 x 256: a layer's attention, forward and backward,
    # 11.1 ms against 8.4 so; AMD EPYC, Zen 5).
    parts = [jnp.concatenate(dq, axis=2), dk.astype(dtype), dv.astype(dtype)]
    return (jnp.stack([x.transpose(0, 2, 1, 3) for x in parts], axis=2),)


_attend_causal.defvjp(_attend_causal_fwd, _attend_causal_bwd)

