"""Data-path speed: `encode` throughput, and the record, Parquet and token-shard inputs against the train step.

    python -m bench.data_speed                 # 50 MB corpus, 2 workers; pipeline vs demo + 124M steps
    python -m bench.data_speed --mb 5 --quick  # smaller corpus, demo-shape step only

The corpus is the standard library's .py files, repeated with a counter in each copy's name
until it reaches --mb megabytes (one document per file). `encode` runs with --workers worker
processes (GPT-2's vocabulary from --encoder_path). The pipeline figure is the record input
(stitch 2, random windows, prefetch off) alone, in tokens/s of model input; the step figure is
the Parquet input (row groups read and tokenized as the
windows are drawn, 2 reader threads) and the bin input (random windows from the corpus encoded
with `encode --format bin`) likewise; the step figure is one jitted training step (float32, AdamW) of the named shape on random tokens, median of 3.
Training is input-bound only if the first is not many times the second.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import statistics
import sysconfig
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
SHAPES = {"demo 2x128 (16 x 128)": (2, 128, 4, 2048, 16, 128), "124M (4 x 256)": (12, 768, 12, 50257, 4, 256)}


def build_corpus(root: pathlib.Path, megabytes: float) -> int:
    sources = sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in sources]
    root.mkdir(parents=True)
    total, copy = 0, 0
    while total < megabytes * 1e6:
        for text, src in zip(texts, sources):
            (root / f"{copy}_{src.name}.txt").write_text(f"# copy {copy}\n{text}", encoding="utf-8")
            total += len(text.encode())
            if total >= megabytes * 1e6:
                break
        copy += 1
    return total


def step_tokens_per_s(shape) -> float:
    import jax
    import jax.numpy as jnp

    from gpt2train.config import Config
    from gpt2train.optimizers import make_optimizer
    from gpt2train.train import init_state, make_train_step

    L, D, H, V, B, T = shape
    cfg = Config(n_layer=L, n_embd=D, n_head=H, n_vocab=V, train_batch_size=B, n_ctx=T, embed_dropout=0.0,
                 attn_dropout=0.0, res_dropout=0.0).validate()
    tx = make_optimizer(cfg)
    state = jax.jit(lambda: init_state(cfg, tx))()
    step = jax.jit(make_train_step(cfg, tx), donate_argnums=0)
    batch = jnp.asarray(np.random.default_rng(0).integers(0, V, (B, T + 1)), jnp.int32)
    times = []
    for i in range(4):
        t = time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready(m)
        if i:
            times.append(time.perf_counter() - t)
    return B * T / statistics.median(times)


def pipeline_tokens_per_s(files, n_ctx: int, batch: int, seconds: float = 5.0) -> float:
    from gpt2train.inputs.tfrecords import RecordWindows

    return _tokens_per_s(RecordWindows(files, 50256, n_ctx, batch, stitch=2, seed=0), n_ctx, batch, seconds)


def write_parquet(text_dir: pathlib.Path, out: pathlib.Path, files: int = 2, rows_per_group: int = 64) -> list[str]:
    """The corpus's documents as `files` Parquet files (a "text" column, row groups of rows_per_group)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [p.read_text(encoding="utf-8") for p in sorted(text_dir.iterdir())]
    out.mkdir(parents=True)
    paths = []
    for i in range(files):
        paths.append(str(out / f"part-{i}.parquet"))
        pq.write_table(pa.table({"text": texts[i::files]}), paths[-1], row_group_size=rows_per_group)
    return paths


def parquet_tokens_per_s(files, n_ctx: int, batch: int, seconds: float = 5.0, readers: int = 2) -> float:
    """The parquet input's windows (row groups read and tokenized by `readers` threads), tokens/s."""
    from gpt2train.inputs.parquet import ParquetWindows
    from gpt2train.tokenizer import GPT2_ENCODER_DIR, load_tokenizer

    src = ParquetWindows(files, load_tokenizer(GPT2_ENCODER_DIR), n_ctx, batch, readers=readers)
    try:
        return _tokens_per_s(src, n_ctx, batch, seconds)
    finally:
        src.close()


def shard_tokens_per_s(files, n_ctx: int, batch: int, seconds: float = 5.0) -> float:
    """The bin input's random windows from llm.c shards (memory-mapped), tokens/s."""
    from gpt2train.inputs.bin import ShardWindows

    return _tokens_per_s(ShardWindows(files, n_ctx, batch, 50257, order="random"), n_ctx, batch, seconds)


def _tokens_per_s(src, n_ctx: int, batch: int, seconds: float) -> float:
    src.next_batch()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        src.next_batch()
        n += 1
    return n * batch * n_ctx / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=float, default=50.0, help="corpus size in MB (default 50)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--encoder_path", default=None, help="default: GPT-2's vocabulary, shipped with the package")
    p.add_argument("--quick", action="store_true", help="time only the demo-shape training step")
    args = p.parse_args()
    from gpt2train.encode import encode_corpus
    from gpt2train.tokenizer import GPT2_ENCODER_DIR
    args.encoder_path = args.encoder_path or GPT2_ENCODER_DIR

    work = pathlib.Path(tempfile.mkdtemp(prefix="data_speed_"))
    try:
        size = build_corpus(work / "text", args.mb)
        print(f"corpus: {size / 1e6:.1f} MB of standard-library text in {len(list((work / 'text').iterdir()))} files")
        summary = encode_corpus(str(work / "text"), str(work / "records"), "bench", args.encoder_path,
                                files_per=50, minimum_size=16, workers=args.workers, progress=False)
        print(f"encode: {summary.mb_per_s:.2f} MB/s with {args.workers} workers "
              f"({summary.tokens:,} tokens, {summary.seconds:.1f} s)")
        files = [str(f) for f in sorted((work / "records").glob("*.tfrecords"))]
        encode_corpus(str(work / "text"), str(work / "shards"), "bench", args.encoder_path, files_per=500,
                      minimum_size=16, workers=args.workers, progress=False, fmt="bin", log=lambda *_: None)
        shard_files = [str(f) for f in sorted((work / "shards").glob("*.bin"))]
        parquet_files = write_parquet(work / "text", work / "parquet")
        print("| shape | input | pipeline tok/s | train step tok/s | pipeline / step |")
        print("| --- | --- | --- | --- | --- |")
        for name, shape in SHAPES.items():
            if args.quick and "124M" in name:
                continue
            step = step_tokens_per_s(shape)
            for source, speed in (("tfrecords", pipeline_tokens_per_s(files, shape[5], shape[4])),
                                  ("parquet (tokenized as read)", parquet_tokens_per_s(parquet_files, shape[5], shape[4])),
                                  ("llm.c shards", shard_tokens_per_s(shard_files, shape[5], shape[4]))):
                print(f"| {name} | {source} | {speed:,.0f} | {step:,.0f} | {speed / step:.0f}x |", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
