"""Training-step speed of this trainer against HF transformers' GPT-2 on PyTorch, side by side
in one run (these machines are noisy: compare figures from the same run only); the reference
runs in its own process (bench/reference.py).

    python -m bench.train_speed            # the demo shape, a 4x256 shape and the 124M shape
    python -m bench.train_speed --quick    # the two small shapes only

Each figure is the median of --steps timed steps after one warm-up step (which compiles).
Both sides run a full step: forward, backward, AdamW update; dropout off; float32 unless noted.
MFU counts 6N + 12*L*T*D FLOPs per token (gpt2train.metrics) against this machine's measured
matmul peak in the same precision.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from .reference import Reference, available as reference_available
from gpt2train.config import Config
from gpt2train.host_memory import reexec_with_resident_heap
from gpt2train.metrics import peak_flops_per_device, train_flops_per_token
from gpt2train.optimizers import make_optimizer
from gpt2train.train import init_state, make_train_step

SHAPES = {  # name: (n_layer, n_embd, n_head, n_vocab, batch, n_ctx)
    "demo 2x128": (2, 128, 4, 2048, 16, 128),
    "4x256": (4, 256, 4, 2048, 16, 128),
    "124M": (12, 768, 12, 50257, 4, 256),
}


def median_seconds(step, steps: int) -> float:
    step()  # warm-up / compile
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def ours(cfg: Config, steps: int) -> float:
    tx = make_optimizer(cfg)
    state = [jax.jit(lambda: init_state(cfg, tx))()]
    train_step = jax.jit(make_train_step(cfg, tx), donate_argnums=0)
    batch = jnp.asarray(np.random.default_rng(0).integers(0, cfg.n_vocab, (cfg.train_batch_size, cfg.n_ctx + 1)),
                        jnp.int32)

    def step():
        state[0], metrics = train_step(state[0], batch)
        jax.block_until_ready(metrics)

    return median_seconds(step, steps)


def reference(cfg: Config, steps: int) -> float | None:
    """The PyTorch step's median seconds, run in its own process (see bench/reference.py)."""
    if not reference_available():
        return None
    ref = Reference()
    try:
        step = ref.workload("train", cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_vocab, cfg.train_batch_size, cfg.n_ctx)
        step()  # warm-up
        return statistics.median(step() for _ in range(steps))
    finally:
        ref.close()


def main() -> None:
    reexec_with_resident_heap()  # as the entry points do (gpt2train/host_memory.py)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="skip the 124M shape")
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {args.steps} timed steps each\n")
    print("| shape | ours f32 | ours bf16 | PyTorch reference | ours f32 / reference | MFU f32 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, (L, D, H, V, B, T) in SHAPES.items():
        if args.quick and name == "124M":
            continue
        cfg = Config(n_layer=L, n_embd=D, n_head=H, n_vocab=V, train_batch_size=B, n_ctx=T,
                     embed_dropout=0.0, attn_dropout=0.0, res_dropout=0.0).validate()
        f32 = ours(cfg, args.steps)
        bf16 = ours(cfg.replace(precision="bfloat16"), args.steps)
        ref = reference(cfg, args.steps)
        tokens = B * T
        peak, _ = peak_flops_per_device(cfg)
        mfu = train_flops_per_token(cfg) * tokens / f32 / peak

        def cell(s):
            return f"{s * 1000:.0f} ms ({tokens / s:,.0f} tok/s)"

        ratio = f"{ref / f32:.2f}x" if ref else "n/a"
        print(f"| {name} | {cell(f32)} | {cell(bf16)} | {cell(ref) if ref else 'torch not installed'} "
              f"| {ratio} | {mfu:.1%} |", flush=True)


if __name__ == "__main__":
    main()
