"""What generate, evaluate and serve run: the config's inference precision resolved, and the
trained parameters loaded and held in that precision.

`inference_precision: bfloat16` holds every weight matrix (the kernels and both embeddings) in
bfloat16, half the bytes a decoding step streams, and computes as `precision: bfloat16` does
(float32 accumulation, LayerNorm, softmax and loss). Every product sees the bfloat16 weights
that bfloat16 compute on float32 weights would cast them to; the one difference is the input
embedding, whose token and position rows are now rounded before they are added. `auto`
picks bfloat16 where the hardware computes it natively (TPUs, GPUs, CPUs with AVX-512 BF16 or
AMX) and the training `precision` elsewhere, where bfloat16 products are emulated.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from . import kernels
from .config import Config

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of x86 CPUs that multiply bf16
ENV = "GPT2TRAIN_NATIVE_BF16"  # 1/0 overrides the detection (tests pin it so every machine agrees)


def native_bf16() -> bool:
    """Whether this machine's default JAX backend computes bfloat16 products natively."""
    forced = os.environ.get(ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    if jax.default_backend() in ("tpu", "gpu"):
        return True
    return any(flag in kernels.cpu_flags() for flag in NATIVE_BF16_FLAGS)


def inference_config(cfg: Config) -> Config:
    """The config with `precision` set to what inference runs in (see the module's doc)."""
    choice = cfg.inference_precision
    if choice == "auto":
        choice = "bfloat16" if native_bf16() else cfg.precision
    return cfg if choice == cfg.precision else cfg.replace(precision=choice)


MATRICES = ("kernel", "wte", "wpe")  # the leaves held in bfloat16; biases and LayerNorm stay float32


def hold_params(params, cfg: Config):
    """The parameters with every weight matrix in the compute dtype (bfloat16: half the bytes);
    biases and LayerNorm parameters stay float32, as the model adds and scales in float32."""
    if cfg.precision != "bfloat16":
        return params

    def hold(path, a):
        name = getattr(path[-1], "key", str(path[-1]))
        return a.astype(jnp.bfloat16) if name in MATRICES else a
    return jax.tree_util.tree_map_with_path(hold, params)


def load_for_inference(cfg: Config, step: int | None = None, tokenizer=None, which: str | int = "last"):
    """(parameters held for inference, their checkpoint step, the inference config) of a trained
    model (the checkpoint `which` names: checkpoint.load_params), on the config's mesh; given the
    `tokenizer`, checked against its vocabulary."""
    from .checkpoint import load_params
    from .mesh import param_shardings
    cfg = inference_config(cfg)
    params, step = load_params(cfg, step, sharding=param_shardings(cfg), tokenizer=tokenizer, which=which)
    return hold_params(params, cfg), step, cfg
