"""Throughput accounting (FLOPs, MFU) and metric sinks (JSONL + TensorBoard).

FLOPs per trained token follow the PaLM paper's count: 6 * N + 12 * n_layer * n_ctx * n_embd,
where N counts every parameter that takes part in a matmul (blocks + the tied output head,
i.e. all parameters except position embeddings) and the second term is attention's
QK^T and AV products (forward + backward). Forward-only work is a third of that.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time

import fsspec
import jax
import jax.numpy as jnp
import numpy as np

from .config import Config
from .paths import local_path

# Dense bf16 peak per chip, FLOP/s, from the vendors' data sheets (H100: the SXM part); a device
# whose kind contains a name takes its figure. The one table: memory.py's sheet reads it too.
ACCELERATOR_PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6e": 918e12,
    "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10G": 125e12,
}


def matmul_params(cfg: Config) -> int:
    D, L = cfg.n_embd, cfg.n_layer
    per_block = 12 * D * D + 13 * D  # qkv + proj + mlp weights and biases, two LayerNorms
    return L * per_block + cfg.n_vocab * D + 2 * D


def train_flops_per_token(cfg: Config, seq_len: int | None = None) -> float:
    T = seq_len or cfg.n_ctx
    return 6.0 * matmul_params(cfg) + 12.0 * cfg.n_layer * T * cfg.n_embd


_measured_peak: dict[str, float] = {}
PEAK_N = 2048  # the probe's product is PEAK_N cubed


def peak_probe(precision: str):
    """One PEAK_N-cube product in precision (bfloat16 inputs accumulate in float32, as the model
    does), on random operands XLA cannot specialise on: a function that runs it and waits."""
    dtype = jnp.bfloat16 if precision == "bfloat16" else jnp.float32
    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(ka, (PEAK_N, PEAK_N)).astype(dtype)
    b = jax.random.normal(kb, (PEAK_N, PEAK_N)).astype(dtype)
    f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    return lambda: f(a, b).block_until_ready()


def peak_flops_per_device(cfg: Config) -> tuple[float, str]:
    """(peak FLOP/s of one device, how it was obtained).

    Accelerators: the data-sheet figure. CPUs: measured here with a 2048^3 matmul in the
    compute precision (bf16 inputs accumulate in f32, as the model does), once per process.
    """
    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", "")
    for name, flops in ACCELERATOR_PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return flops, f"{kind} data sheet"
    key = cfg.precision
    if key not in _measured_peak:
        # The fastest of ten runs: a peak is what the machine can do, and a busy moment only ever
        # slows a run (a median taken beside another process once put a bf16 step at 113% "MFU").
        probe = peak_probe(cfg.precision)
        probe()
        times = []
        for _ in range(10):
            t0 = time.perf_counter()
            probe()
            times.append(time.perf_counter() - t0)
        _measured_peak[key] = 2 * PEAK_N ** 3 / min(times)
    return _measured_peak[key], f"measured {cfg.precision} matmul on {kind or dev.platform}"


class ThroughputWindow:
    """The per-step metrics since the last log line, reduced to one record.

    Every metric the train step returns is averaged over the window, except those in LAST
    (the learning rate at the window's end); a metric added to the step reaches metrics.jsonl
    and TensorBoard with no other change. tokens/s and MFU count wall time, minus the time spent
    inside `excluded()` (evaluation, checkpoints: work that is not training)."""

    LAST = frozenset({"lr"})

    def __init__(self, tokens_per_step: int, flops_per_step: float, peak_flops: float):
        self.tokens_per_step, self.flops_per_step, self.peak = tokens_per_step, flops_per_step, peak_flops
        self.restart()

    def restart(self) -> None:
        """Drop the steps so far and start the clock again."""
        self._steps: list[dict] = []
        self._start, self._excluded = time.perf_counter(), 0.0

    def elapsed(self) -> float:
        return time.perf_counter() - self._start - self._excluded

    def add(self, metrics: dict) -> None:
        self._steps.append(metrics)

    @contextlib.contextmanager
    def excluded(self):
        t = time.perf_counter()
        try:
            yield
        finally:
            self._excluded += time.perf_counter() - t

    def summary(self, step: int) -> dict | None:
        """One record for the window ending at `step` (None if it holds no step); restarts it."""
        if not self._steps:
            return None
        steps, elapsed = self._steps, max(self.elapsed(), 1e-9)
        line = {"step": step}
        for key in steps[-1]:
            values = [m[key] for m in steps if key in m]
            line[key] = values[-1] if key in self.LAST else float(sum(values) / len(values))
        tok_s = len(steps) * self.tokens_per_step / elapsed
        line.update(tokens_per_s=tok_s, mfu=tok_s / self.tokens_per_step * self.flops_per_step / self.peak,
                    time=time.time())
        if "loss" in line:
            line["ppl"] = math.exp(min(line["loss"], 50.0))
        self.restart()
        return line


class MetricsWriter:
    """Appends one JSON object per record to metrics.jsonl and mirrors scalars to TensorBoard;
    samples go to samples.jsonl and TensorBoard text. Sinks added with `add_sink` (W&B) get the
    same scalars, samples and images: objects with scalars(record), samples(step, rows),
    image(tag, path, step) and close()."""

    def __init__(self, model_path: str, enabled: bool = True):
        self.enabled = enabled and bool(model_path)
        self.path = model_path.rstrip("/") + "/metrics.jsonl"
        self.samples_path = model_path.rstrip("/") + "/samples.jsonl"
        self.sinks: list = []
        self._tb = None
        if self.enabled:
            try:
                from tensorboardX import SummaryWriter
                local = local_path(model_path)
                if local is not None:  # TensorBoard files only locally; JSONL goes anywhere
                    self._tb = SummaryWriter(os.path.join(local, "tensorboard"))
            except ImportError:  # TensorBoard files are a convenience, JSONL is the record
                self._tb = None

    def add_sink(self, sink) -> None:
        if self.enabled:
            self.sinks.append(sink)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if isinstance(v, (np.floating, np.integer, jax.Array)) else v)
                 for k, v in record.items()}
        with fsspec.open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")
        if self._tb is not None and "step" in clean:
            for k, v in clean.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, clean["step"])
            self._tb.flush()
        if "step" in clean:
            for sink in self.sinks:
                sink.scalars({k: v for k, v in clean.items() if isinstance(v, (int, float))})

    def write_samples(self, step: int, rows: list[dict]) -> None:
        """Texts generated at `step`, each a {"prompt", "text"}: samples.jsonl, TensorBoard, sinks."""
        if not self.enabled:
            return
        with fsspec.open(self.samples_path, "a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps({"step": step, **row}, ensure_ascii=False) + "\n")
        if self._tb is not None:
            for i, row in enumerate(rows):  # TensorBoard renders text as Markdown: keep it verbatim
                self._tb.add_text(f"samples/{i}", "```\n" + row["prompt"] + row["text"] + "\n```", step)
            self._tb.flush()
        for sink in self.sinks:
            sink.samples(step, rows)

    def image(self, tag: str, path: str, step: int) -> None:
        """An image file written at `step` (the curves), for the sinks that show images."""
        for sink in self.sinks:
            sink.image(tag, path, step)

    def forget_after(self, step: int) -> int:
        """Drop records of steps after `step` (a run killed after its last checkpoint logged steps
        that the resumed run does again) from metrics.jsonl and samples.jsonl; returns how many
        metrics records were dropped. Other records stay."""
        if not self.enabled:
            return 0
        _drop_after(self.samples_path, step)
        return _drop_after(self.path, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            sink.close()


def _drop_after(jsonl_path: str, step: int) -> int:
    """Remove the records of a JSONL file whose "step" is after `step`; returns how many."""
    fs, path = fsspec.core.url_to_fs(jsonl_path)
    if not fs.exists(path):
        return 0
    with fs.open(path, "r", encoding="utf-8") as f:
        lines = f.read().splitlines()

    def later(line):
        try:
            return json.loads(line).get("step", -1) > step
        except (ValueError, AttributeError):
            return False  # not ours to judge: keep it
    kept = [line for line in lines if not later(line)]
    if len(kept) != len(lines):
        with fs.open(path + ".tmp", "w", encoding="utf-8") as f:  # then a rename: a kill here keeps the old file
            f.write("".join(line + "\n" for line in kept))
        fs.mv(path + ".tmp", path)
    return len(lines) - len(kept)
