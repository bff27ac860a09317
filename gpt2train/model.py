"""GPT-2 as plain JAX functions over a parameter pytree.

Parameters use GPT-2's own names, with the blocks stacked on a leading layer axis so the
forward pass is one `lax.scan` (compile time independent of depth):

    wte [V_pad, D]   wpe [n_ctx, D]   ln_f {scale, bias} [D]
    h/ln_1, h/ln_2            {scale, bias} [L, D]
    h/attn/c_attn             {kernel [L, D, 3D], bias [L, 3D]}
    h/attn/c_proj             {kernel [L, D, D],  bias [L, D]}
    h/mlp/c_fc                {kernel [L, D, 4D], bias [L, 4D]}
    h/mlp/c_proj              {kernel [L, 4D, D], bias [L, D]}

A training state on CPU holds `h` as a list of per-layer pytrees instead (split_layers,
train.layered); checkpoints always hold the stack.

Kernels are [in, out], as in GPT-2's checkpoints. The output head is tied to `wte`; rows past
`n_vocab` (padding for fast matmuls) are zero and their logits are masked to -inf-ish.
Weights are stored in float32; `precision: bfloat16` casts them to bfloat16 for compute and
accumulates every matmul in float32 (faster than bf16 accumulation on CPUs, and safer).
The matrix products and causal attention come from kernels.py, which has an implementation
written for XLA:CPU and a standard one for GPU/TPU (config key `kernels`).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from . import kernels
from .config import Config

Params = dict[str, Any]
LN_EPS = 1e-5
MASKED = -1e9  # logit for padded vocabulary rows: exp() underflows to exactly 0


def compute_dtype(cfg: Config):
    return jnp.bfloat16 if cfg.precision == "bfloat16" else jnp.float32


# ----------------------------------------------------------------------------- init
def init_params(cfg: Config, key: jax.Array) -> Params:
    """GPT-2's init: N(0, 0.02) weights (0.01 for positions), zero biases, unit LayerNorm.

    scale_by_depth: residual output projections get std / sqrt(2 * n_layer).
    scale_by_in:    every matmul weight gets std 1 / sqrt(fan_in) instead of 0.02.
    """
    L, D, V = cfg.n_layer, cfg.n_embd, cfg.padded_vocab
    keys = jax.random.split(key, 6)

    def normal(k, shape, fan_in, residual=False):
        std = 1.0 / math.sqrt(fan_in) if cfg.scale_by_in else 0.02
        if residual and cfg.scale_by_depth:
            std /= math.sqrt(2 * L)
        return std * jax.random.normal(k, shape, jnp.float32)

    wte = normal(keys[0], (V, D), D)
    wte = wte.at[cfg.n_vocab:].set(0.0)  # padding rows never matter; keep them inert
    # Fresh arrays for every leaf: shared buffers could not be donated to the train step.
    ones = lambda: jnp.ones((L, D))  # noqa: E731
    zeros = lambda: jnp.zeros((L, D))  # noqa: E731
    return {
        "wte": wte,
        "wpe": 0.01 * jax.random.normal(keys[1], (cfg.n_ctx, D), jnp.float32),
        "h": {
            "ln_1": {"scale": ones(), "bias": zeros()},
            "attn": {
                "c_attn": {"kernel": normal(keys[2], (L, D, 3 * D), D), "bias": jnp.zeros((L, 3 * D))},
                "c_proj": {"kernel": normal(keys[3], (L, D, D), D, residual=True), "bias": zeros()},
            },
            "ln_2": {"scale": ones(), "bias": zeros()},
            "mlp": {
                "c_fc": {"kernel": normal(keys[4], (L, D, 4 * D), D), "bias": jnp.zeros((L, 4 * D))},
                "c_proj": {"kernel": normal(keys[5], (L, 4 * D, D), 4 * D, residual=True), "bias": zeros()},
            },
        },
        "ln_f": {"scale": jnp.ones((D,)), "bias": jnp.zeros((D,))},
    }


def abstract_params(cfg: Config) -> Params:
    """The parameters' shapes and dtypes (jax.ShapeDtypeStruct leaves), nothing allocated."""
    return jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))


def count_params(params: Params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))


def split_layers(params: Params) -> Params:
    """The parameters with the stacked blocks `h` as a list of per-layer pytrees (a training state's
    layout on CPU, train.layered): a fully unrolled forward pass then reads each layer's weights
    where they lie, and the backward pass writes each layer's gradients as they are, where from
    the stack XLA:CPU copied every weight out (82 ms of a 124M bfloat16 step on an Intel Xeon)
    and every gradient back in (48 ms)."""
    n_layer = jax.tree.leaves(params["h"])[0].shape[0]
    return {**params, "h": [jax.tree.map(lambda a, i=i: a[i], params["h"]) for i in range(n_layer)]}


def stack_layers(params: Params) -> Params:
    """split_layers undone: the layers' pytrees stacked on a leading axis, as checkpoints hold them."""
    return {**params, "h": jax.tree.map(lambda *layers: jnp.stack(layers), *params["h"])}


# ----------------------------------------------------------------------------- layers
def layer_norm(x, p, dtype, impl: str = "standard"):
    """LayerNorm over the last axis in float32, rounded to dtype. impl: the `kernels` to run it
    with (a bfloat16 x may go to our kernel: kernels.native_layer_norm)."""
    if dtype == jnp.bfloat16 and kernels.native_layer_norm(x, impl):
        return kernels.layer_norm(x, p["scale"], p["bias"], LN_EPS)
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + LN_EPS)
    return (y * p["scale"] + p["bias"]).astype(dtype)


def add_layer_norm(x, a, p, dtype, impl: str = "standard"):
    """(x + a, layer_norm(x + a)): a residual branch added to the stream, then the LayerNorm that
    follows it, in one pass each way where our kernel takes x (kernels.add_layer_norm)."""
    if dtype == jnp.bfloat16 and x.dtype == a.dtype == jnp.bfloat16 and kernels.native_layer_norm(x, impl):
        return kernels.add_layer_norm(x, a, p["scale"], p["bias"], LN_EPS)
    s = x + a
    return s, layer_norm(s, p, dtype, impl)


def dense(x, p, dtype, impl: str = "auto", gelu: bool = False):
    """x [..., in] @ kernel + bias, in dtype, through GELU if asked. impl: the `kernels` to multiply with."""
    # As a 2-D matmul over all tokens: XLA:CPU differentiates a batched [B, T, D] einsum into
    # weight-gradient dots it runs ~30% slower than the same 2-D ones (measured at 4x256).
    x2 = x.reshape(-1, x.shape[-1])
    if "kernel_t" in p:  # [out, in], for decoding (see decode_params)
        y = kernels.matmul(x2, p["kernel_t"], transposed=True, impl=impl, decoding=True)
        y = _activated((y + p["bias"]).astype(dtype), gelu)
    elif kernels.native_dense(x2, p["kernel"], impl):
        y = kernels.dense(x2, p["kernel"], p["bias"], gelu, functools.partial(_dense, impl=impl, dtype=dtype, gelu=gelu))
    else:
        y = _dense(x2, p["kernel"], p["bias"], impl=impl, dtype=dtype, gelu=gelu)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def _dense(x2, kernel, bias, *, impl: str, dtype, gelu: bool):
    return _activated((kernels.matmul(x2, kernel, impl=impl) + bias).astype(dtype), gelu)


def _activated(y, gelu: bool):
    return kernels.gelu(y) if gelu else y


def dropout(x, rate: float, key):
    if key is None or rate <= 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def _attend_masked(q, k, v, allowed, rate=0.0, key=None):
    """Attention where query t reads key s if allowed[b, t, s] ([B or 1, T, T], every query
    allowed at least one key), with dropout on the probabilities (the fused kernel has none)."""
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(q.shape[-1])
    probs = jax.nn.softmax(jnp.where(allowed[:, None], s, -jnp.inf), axis=-1)
    probs = dropout(probs, rate, key).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def attention(x, p, cfg: Config, dtype, key=None, cache=None, mask=None):
    """Multi-head causal self-attention.

    cache: None for a full causal pass, or (k_cache, v_cache, index, key_mask) for decoding:
    the new keys/values are written at slot `index`, and queries attend to every slot that
    key_mask [B, T, S] allows. mask [B, T, T]: which keys each query reads, instead of the
    causal pattern (several texts packed into one row). Returns (output, (k_cache, v_cache) or None).
    """
    B, T, D = x.shape
    H, Dh = cfg.n_head, cfg.head_dim
    qkv = dense(x, p["c_attn"], dtype, cfg.kernels).reshape(B, T, 3, H, Dh)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    new_cache = None
    if cache is not None:
        # Caches are [B * H, S, Dh]: head-major, so the score and value products read them as
        # they lie (a [B, S, H, Dh] cache was transposed, i.e. copied whole, at every token), and
        # with batch and heads folded into one axis (with a separate batch axis of size 1, XLA
        # duplicated the in-place update and copied every cache at every token).
        k_cache, v_cache, index, key_mask = cache
        heads = lambda a: a.transpose(0, 2, 1, 3).reshape(B * H, T, Dh)  # noqa: E731
        k_cache = _write_cache(k_cache, heads(k), index, H)
        v_cache = _write_cache(v_cache, heads(v), index, H)
        # Queries read the first S slots that key_mask covers: a server's batch whose texts are
        # short reads that much of its context-long caches, not all of them.
        S = key_mask.shape[-1]
        if k_cache.dtype == CACHE_BITS and kernels.native_cached_attention(cfg.kernels):
            out = kernels.cached_attention(heads(q).astype(jnp.bfloat16), k_cache, v_cache, key_mask)
        else:
            k_read, v_read = (k_cache, v_cache) if S == k_cache.shape[1] else (k_cache[:, :S], v_cache[:, :S])
            k_read, v_read = _cache_values(k_read, dtype), _cache_values(v_read, dtype)
            scores = jnp.einsum("ntd,nsd->nts", heads(q), k_read, preferred_element_type=jnp.float32)
            scores = scores.reshape(B, H, T, -1)
            # A finite floor: padding rows see no key at all and must not turn into NaN.
            scores = jnp.where(key_mask[:, None, :, :], scores / math.sqrt(Dh), -1e30)
            probs = jax.nn.softmax(scores, axis=-1).astype(dtype).reshape(B * H, T, -1)
            out = jnp.einsum("nts,nsd->ntd", probs, v_read)
        out = out.astype(dtype).reshape(B, H, T, Dh).transpose(0, 2, 1, 3)
        new_cache = (k_cache, v_cache)
    elif mask is not None:
        out = _attend_masked(q, k, v, mask)
    elif key is not None and cfg.attn_dropout > 0:
        out = _attend_masked(q, k, v, jnp.tril(jnp.ones((1, T, T), bool)), cfg.attn_dropout, key)
    else:
        out = kernels.causal_attention(qkv, cfg.kernels)
    return dense(out.reshape(B, T, D), p["c_proj"], dtype, cfg.kernels), new_cache


# A bfloat16 cache is held as its bits, in uint16: XLA:CPU updates a bfloat16 array by converting
# all of it to float32 and back, which copied every cache whole at every token (17 ms of a 61 ms
# batch-8 decode step at 124M), while an integer array is updated in place.
CACHE_BITS = kernels.BF16_BITS


def _cache_values(cache, dtype):
    """A cache (or a slice of one) as values in dtype."""
    if cache.dtype == CACHE_BITS:
        cache = jax.lax.bitcast_convert_type(cache, jnp.bfloat16)
    return cache.astype(dtype)


def _write_cache(cache, new, index, n_head: int):
    """Write new [B * H, T, Dh] at slot `index` of cache [B * H, S, Dh]: one slot for every row
    (a scalar: an in-place slice update) or each row its own ([B]: a scatter, for a server's
    batch whose rows hold texts of different lengths)."""
    if cache.dtype == CACHE_BITS:
        new = jax.lax.bitcast_convert_type(new.astype(jnp.bfloat16), CACHE_BITS)
    new = new.astype(cache.dtype)
    if jnp.ndim(index) == 0:
        return jax.lax.dynamic_update_slice(cache, new, (0, index, 0))
    rows = jnp.arange(cache.shape[0])[:, None]
    slots = jnp.repeat(index, n_head)[:, None] + jnp.arange(new.shape[1])[None, :]
    return cache.at[rows, slots].set(new, mode="drop")


def mlp(x, p, dtype, impl: str):
    return dense(dense(x, p["c_fc"], dtype, impl, gelu=True), p["c_proj"], dtype, impl)


def block(x, p, cfg: Config, dtype, key=None, cache=None, mask=None):
    """Pre-LayerNorm residual block. `key` enables dropout (training)."""
    x, m, new_cache = _block(x, None, p, cfg, dtype, key, cache, mask)
    return x + m, new_cache


def _block(x, pending, p, cfg: Config, dtype, key=None, cache=None, mask=None):
    """block with the stream x + pending (pending: the previous block's last residual branch, not
    yet added; None for none). Returns (x, m, cache): the block's output is x + m, m left unadded
    for the next block's first LayerNorm to add in its own pass (add_layer_norm)."""
    k_attn, k_res1, k_res2 = jax.random.split(key, 3) if key is not None else (None, None, None)
    norm = cfg.kernels if cache is None else "standard"  # decoding's few rows stay on XLA
    if pending is None:
        h = layer_norm(x, p["ln_1"], dtype, norm)
    else:
        x, h = add_layer_norm(x, pending, p["ln_1"], dtype, norm)
    a, new_cache = attention(h, p["attn"], cfg, dtype, k_attn, cache, mask)
    x, h = add_layer_norm(x, dropout(a, cfg.res_dropout, k_res1), p["ln_2"], dtype, norm)
    m = mlp(h, p["mlp"], dtype, cfg.kernels)
    return x, dropout(m, cfg.res_dropout, k_res2), new_cache


# ----------------------------------------------------------------------------- model
def embed(params, tokens, positions, cfg: Config, dtype, key=None):
    if "wte_t" in params:  # decoding's [D, V] table (decode_params): gather columns
        rows = jnp.moveaxis(jnp.take(params["wte_t"], tokens, axis=1), 0, -1)
    elif "wte_bits" in params:  # decoding's bfloat16 [V, D] table as its bits (laid_out_for)
        rows = jax.lax.bitcast_convert_type(params["wte_bits"][tokens], jnp.bfloat16)
    else:
        rows = params["wte"][tokens]
    x = rows + params["wpe"][positions]
    return dropout(x.astype(dtype), cfg.embed_dropout, key)


def layer_unroll(cfg: Config) -> int:
    """Layers per scan iteration. Unrolling lets XLA schedule across layers (measured on CPU:
    ~17% faster steps at 2-4 layers, ~13% at 124M) at the cost of compile time that grows
    with depth, so by default only models of up to 12 layers are fully unrolled."""
    if cfg.scan_unroll > 0:
        return min(cfg.scan_unroll, cfg.n_layer)
    return cfg.n_layer if cfg.n_layer <= 12 else 1


def hidden_states(params: Params, tokens: jax.Array, cfg: Config, *, key: jax.Array | None = None,
                  positions: jax.Array | None = None, mask: jax.Array | None = None) -> jax.Array:
    """The last block's output [B, T, D] (before ln_f) for tokens [B, T]. A `key` turns dropout on.
    positions [B, T] and mask [B, T, T] (see attention) replace 0..T-1 and the causal pattern."""
    dtype = compute_dtype(cfg)
    T = tokens.shape[1]
    if key is not None:
        key, k_embed = jax.random.split(key)
    else:
        k_embed = None
    x = embed(params, tokens, jnp.arange(T)[None, :] if positions is None else positions, cfg, dtype, k_embed)

    # Where our LayerNorm kernel adds the residual branch (add_layer_norm), each block leaves its
    # last branch for the next to add; elsewhere blocks add it themselves, so that remat keeps one
    # array per layer, not two.
    defer = dtype == jnp.bfloat16 and kernels.native_layer_norm(x, cfg.kernels)

    def body(stream, layer):  # stream: (x, the last block's residual branch not yet added, or None)
        p, i = layer
        layer_key = None if key is None else jax.random.fold_in(key, i)
        x, m, _ = _block(*stream, p, cfg, dtype, layer_key, mask=mask)
        return ((x, m) if defer else (x + m, None)), None

    if cfg.remat:
        body = jax.checkpoint(body, policy=getattr(jax.checkpoint_policies, cfg.remat_policy))
    if isinstance(params["h"], list):  # one pytree per layer (split_layers): weights read as they lie
        stream = (x, None)
        for i, p in enumerate(params["h"]):
            stream, _ = body(stream, (p, i))
    else:  # a scan's carry keeps one structure: deferring, the first layer adds zeros
        stream, _ = jax.lax.scan(body, (x, jnp.zeros_like(x) if defer else None),
                                 (params["h"], jnp.arange(cfg.n_layer)), unroll=layer_unroll(cfg))
    x, pending = stream
    return x if pending is None else x + pending


def logits_from_hidden(params, x, cfg: Config):
    """Tied output head in float32 accumulation; padded vocabulary rows masked."""
    return head_logits(params, layer_norm(x, params["ln_f"], x.dtype), cfg)


def head_logits(params, x, cfg: Config, mask_padding: bool = True):
    """The head's logits of x [..., D] already through ln_f; the padded vocabulary's masked unless
    mask_padding is off (for a loss that counts the first n_vocab columns only)."""
    x2 = x.reshape(-1, x.shape[-1])  # 2-D for the same reason as in dense()
    if "wte_t" in params:  # decoding's [D, V] table (decode_params)
        logits = kernels.matmul(x2, params["wte_t"], impl=cfg.kernels)
    elif "wte_bits" in params:  # decoding's bfloat16 [V, D] table as its bits (laid_out_for)
        logits = kernels.matmul(x2, params["wte_bits"], transposed=True, impl=cfg.kernels, decoding=True)
    else:  # wte [V, D] as it lies: through wte.T, XLA:CPU ran all three head products in float32
        logits = kernels.matmul(x2, params["wte"], transposed=True, impl=cfg.kernels, decoding="layers" in params)
    logits = logits.reshape(*x.shape[:-1], logits.shape[-1])
    if mask_padding and cfg.padded_vocab != cfg.n_vocab:
        # Added, not selected: the gradient of an added constant is the identity, while a
        # select's backward is one more pass over the [tokens, V] logits (~0.1 s of a bf16 124M step).
        logits = logits + jnp.where(jnp.arange(cfg.padded_vocab) < cfg.n_vocab, 0.0, MASKED)
    return logits


def forward(params: Params, tokens: jax.Array, cfg: Config, *, key: jax.Array | None = None) -> jax.Array:
    """Logits [B, T, V_pad] (float32) for tokens [B, T]. A `key` turns dropout on."""
    return logits_from_hidden(params, hidden_states(params, tokens, cfg, key=key), cfg)


LOSS_ROWS = 2048  # tokens per slice of the output head in _head_losses


def token_losses(params: Params, batch: jax.Array, cfg: Config, *, key=None) -> jax.Array:
    """Per-token next-token cross-entropy [B, T] for windows batch [B, T + 1].

    Without a gradient, in bfloat16 on CPUs with AVX-512 BF16 or AMX, the head and its losses are one compiled
    kernel that never writes the logits out (kernels.native_head_losses); otherwise _head_losses."""
    x = hidden_states(params, batch[:, :-1], cfg, key=key)
    B, T, D = x.shape
    x = layer_norm(x.reshape(B * T, D), params["ln_f"], x.dtype, cfg.kernels)
    targets = batch[:, 1:].reshape(B * T)
    reference = functools.partial(_head_losses, cfg=cfg)
    if kernels.native_head_losses(x, params["wte"], cfg.n_vocab, cfg.kernels):
        return kernels.head_losses(x, params["wte"], targets, cfg.n_vocab, reference).reshape(B, T)
    return reference(x, params["wte"], targets).reshape(B, T)


def _head_losses(x, wte, targets, cfg: Config):
    """Token losses [N] of x [N, D] (through ln_f) under the tied head wte: the logits by XLA, the
    losses by XLA too, or in float32 by our kernel (kernels.native_cross_entropy).

    The head runs over slices of LOSS_ROWS tokens, each reduced to its losses while its logits
    are fresh: the full [N, V] logits (1.6 GB at 8 x 1024) are never written out and read back
    (~5% of an 8 x 1024 evaluation on CPU), and the backward pass holds one slice's logits at a time."""
    native = kernels.native_cross_entropy(x, cfg.kernels)  # float32: one pass over the logits each way
    losses = []
    for start in range(0, x.shape[0], LOSS_ROWS):
        rows, wanted = x[start:start + LOSS_ROWS], targets[start:start + LOSS_ROWS]
        logits = head_logits({"wte": wte}, rows, cfg, mask_padding=not native)
        if native:
            losses.append(kernels.cross_entropy(logits, wanted, cfg.n_vocab))
        else:
            picked = jnp.take_along_axis(logits, wanted[:, None], axis=-1)[:, 0]
            losses.append(jax.nn.logsumexp(logits, axis=-1) - picked)
    return jnp.concatenate(losses)


# ----------------------------------------------------------------------------- decoding
def init_cache(cfg: Config, batch: int, length: int) -> dict:
    """Preallocated key/value caches, one [B * H, length, Dh] array per layer in the compute dtype
    (bfloat16 as its bits: CACHE_BITS).

    Separate arrays (not one stacked [L, ...] array) let each decode step update every layer's
    cache in place; a stacked cache would be rewritten whole at every token."""
    shape = (batch * cfg.n_head, length, cfg.head_dim)
    dtype = CACHE_BITS if cfg.precision == "bfloat16" else compute_dtype(cfg)
    return {"k": [jnp.zeros(shape, dtype) for _ in range(cfg.n_layer)],
            "v": [jnp.zeros(shape, dtype) for _ in range(cfg.n_layer)]}


def decode_params(params: Params) -> Params:
    """The parameters with the stacked blocks split into one pytree per layer, for decoding:
    each layer's weights are then their own buffers, read in place at every token instead of
    being sliced out of the stack (a copy) inside the compiled step. A layer may carry
    `kernel_t` ([out, in]) instead of `kernel`: XLA:CPU's matrix-vector product reads that
    layout faster (a 12-layer 124M weight stream 15% faster at batch 1, measured), while
    several rows at once may be faster with [in, out] kernels (laid_out_for).
    The tied head is held as `wte_t` [D, V]: at the vocabulary's width XLA:CPU streams that
    layout faster at every batch size (measured at 124M: 38 against 32 GB/s at batch 1, 29
    against 17 at batch 8); the embedding gathers its columns."""
    n_layer = jax.tree.leaves(params["h"])[0].shape[0]
    layers = [jax.tree.map(lambda a, i=i: a[i], params["h"]) for i in range(n_layer)]
    rest = {k: v for k, v in params.items() if k not in ("h", "wte")}
    return {**rest, "wte_t": params["wte"].T, "layers": layers}


def laid_out_for(params: Params, rows: int) -> Params:
    """Decode parameters (decode_params) with their layer kernels and tied head in the layouts
    that decoding `rows` texts at once reads fastest: layers by kernels.decode_transposed; the
    head as `wte_t` [D, V], or, where kernels.native_rows takes it, [V, D]: `wte` in float32,
    `wte_bits` in bfloat16 -- the table held as its bits (uint16), as the caches are: XLA:CPU
    gathers bfloat16 rows in float32, converting the whole table first (once per compiled call,
    10.8 ms of a server's 40 ms 124M step with 16 slots), uint16 rows as they are. Unchanged if
    already so; otherwise converted in place."""
    c_fc = params["layers"][0]["mlp"]["c_fc"]
    dtype = (c_fc.get("kernel_t", c_fc.get("kernel"))).dtype
    if kernels.decode_transposed(rows, dtype) != ("kernel_t" in c_fc):
        params = {**params, "layers": _swap_kernel_layouts(params["layers"])}
    head = next(k for k in ("wte_t", "wte", "wte_bits") if k in params)
    want = ("wte_bits" if dtype == jnp.bfloat16 else "wte") if kernels.native_rows(rows, dtype) else "wte_t"
    if head != want:
        params = {**{k: v for k, v in params.items() if k != head}, want: _relaid_head(params[head], head, want)}
    return params


@functools.partial(jax.jit, static_argnums=(1, 2), donate_argnums=0)
def _relaid_head(table, head: str, want: str):
    """The tied head moved from its `head` form to its `want` form (see laid_out_for)."""
    wte = {"wte_t": lambda: table.T, "wte": lambda: table,
           "wte_bits": lambda: jax.lax.bitcast_convert_type(table, jnp.bfloat16)}[head]()
    return {"wte_t": lambda: wte.T, "wte": lambda: wte,
            "wte_bits": lambda: jax.lax.bitcast_convert_type(wte, kernels.BF16_BITS)}[want]()


@functools.partial(jax.jit, donate_argnums=0)  # decode_params' layers are copies: converted in place
def _swap_kernel_layouts(layers):
    """Swap every layer kernel between [in, out] (`kernel`) and [out, in] (`kernel_t`)."""
    def swap(tree):
        if "kernel" in tree:
            return {"kernel_t": tree["kernel"].T, "bias": tree["bias"]}
        if "kernel_t" in tree:
            return {"kernel": tree["kernel_t"].T, "bias": tree["bias"]}
        return {k: swap(v) if isinstance(v, dict) else v for k, v in tree.items()}
    return [swap(layer) for layer in layers]


def forward_cached(params: Params, tokens: jax.Array, cache: dict, index, pad: jax.Array, cfg: Config,
                   *, last_only: bool = False, at: jax.Array | None = None, span: int | None = None):
    """Run tokens [B, T] occupying cache slots index..index+T-1; return (logits, cache).
    index: a scalar (every row at the same slot) or [B] (each row at its own).
    last_only: logits [B, 1, V] of the last position alone (a prefill needs no others: the
    head over every prompt position was ~30% of a prefill's work at 124M); at [B]: of position
    at[b] of each row alone (a right-padded prompt's last token). span: attend to the first
    `span` cache slots only (every row's text must lie within them).

    params: as from decode_params. pad [B]: how many left-padding slots each row has (its real
    tokens start at slot pad[b]); positions count from there, and padding slots are never
    attended to.
    """
    dtype = compute_dtype(cfg)
    B, T = tokens.shape
    S = span or cache["k"][0].shape[1]
    slots = jnp.broadcast_to(jnp.asarray(index)[..., None] + jnp.arange(T), (B, T))  # [B, T]
    positions = jnp.maximum(slots - pad[:, None], 0)                  # [B, T]
    key_slots = jnp.arange(S)
    key_mask = (key_slots[None, None, :] <= slots[:, :, None]) & (key_slots[None, None, :] >= pad[:, None, None])
    x = embed(params, tokens, positions, cfg, dtype)
    new_k, new_v = [], []
    for p, k_cache, v_cache in zip(params["layers"], cache["k"], cache["v"]):
        x, (k_cache, v_cache) = block(x, p, cfg, dtype, cache=(k_cache, v_cache, index, key_mask))
        new_k.append(k_cache)
        new_v.append(v_cache)
    if last_only:
        x = x[:, -1:]
    elif at is not None:
        x = jnp.take_along_axis(x, at[:, None, None], axis=1)
    return logits_from_hidden(params, x, cfg), {"k": new_k, "v": new_v}
