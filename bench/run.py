"""Every benchmark in one run, side by side with the PyTorch reference; a JSON + Markdown report.

    python -m bench.run                  # full suite (~15 minutes on 2 cores), from the repository's root
    python -m bench.run --quick          # fewer repeats, shorter time-to-quality
    python -m bench.run --smoke          # toy sizes, seconds: checks the suite itself (CI)
    python -m bench.run --only train,generate --out bench/results

Figures are medians of --repeats timed runs after a warm-up (which compiles). Ours and the
reference alternate inside each benchmark, so load on the machine hits both alike; ratios are
only meaningful within one report. See bench/README.md for what each benchmark measures.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import pathlib
import platform
import statistics
import tempfile
import time

import numpy as np

from gpt2train.tokenizer import GPT2_ENCODER_DIR

from .reference import Reference, available as reference_available

REPO = pathlib.Path(__file__).resolve().parents[1]

SIZES = {  # name: (n_layer, n_embd, n_head, n_vocab, batch, n_ctx)
    "full": {"train_small": (4, 128, 4, 50257, 12, 64), "train_124M": (12, 768, 12, 50257, 4, 256),
             "gen": (12, 768, 12, 50257), "eval": (12, 768, 12, 50257, 8, 1024),
             "tasks": (12, 768, 12, 50257, 8, 1024)},
    "smoke": {"train_small": (2, 32, 2, 50257, 4, 16), "train_124M": (2, 64, 4, 50257, 2, 32),
              "gen": (2, 64, 4, 50257), "eval": (2, 64, 4, 50257, 2, 64),
             "tasks": (2, 64, 4, 50257, 8, 64)},
}


def config(L, D, H, V, B=1, T=1024, **kw):
    from gpt2train.config import Config
    return Config(n_layer=L, n_embd=D, n_head=H, n_vocab=V, train_batch_size=B, eval_batch_size=B, n_ctx=T,
                  embed_dropout=0.0, attn_dropout=0.0, res_dropout=0.0, **kw).validate()


def timed(fn) -> float:
    """Seconds one call takes; a function that times itself (the reference process) returns them."""
    t = time.perf_counter()
    own = fn()
    return own if isinstance(own, float) else time.perf_counter() - t


def peak_probes(precisions) -> dict:
    """metrics.peak_probe per precision, named `peak_<precision>`, to run in the same turns as a
    benchmark: the machine is shared, and a peak measured once at a slow moment put a float32
    step at 140% "MFU"."""
    from gpt2train.metrics import peak_probe
    return {f"peak_{precision}": peak_probe(precision) for precision in precisions}


def best_peak(cfg, secs: dict) -> float:
    """The higher of the process's peak (measured once) and the fastest probe in secs."""
    from gpt2train.metrics import PEAK_N, peak_flops_per_device
    measured, _ = peak_flops_per_device(cfg)
    probe = secs.get(f"peak_{cfg.precision}")
    return max(measured, 2 * PEAK_N ** 3 / probe) if probe else measured


def alternate(fns: dict, repeats: int, fastest: tuple = ()) -> dict:
    """Median seconds of each function, run in turns after one warm-up call each; for the
    `fastest` ones (probes of what the machine can do at best), the fastest run instead."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(timed(fn))
    return {k: min(v) if k in fastest else statistics.median(v) for k, v in times.items()}


# ---------------------------------------------------------------- machine


def tasks_reference_available() -> bool:
    import importlib.util
    return importlib.util.find_spec("lm_eval") is not None and reference_available()


# Instruction sets that decide how fast each side's matrix products can be: AMX tiles and
# AVX-512 with bf16/fp16 arithmetic (oneDNN and MKL use them; XLA:CPU's YNNPACK does not always).
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_fp16", "amx_int8")


def cpu_model_and_flags() -> tuple[str, list[str]]:
    """The CPU's model name and which of ISA_FLAGS /proc/cpuinfo lists for it."""
    from gpt2train.kernels import cpu_flags
    cpu = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return cpu, [f for f in ISA_FLAGS if f in cpu_flags()]


def xla_intra_op_threads() -> int:
    """XLA:CPU's intra-op threads, counted after a product has run: the threads of its Eigen
    pool (named XLAEigen), one per core it may use unless XLA_FLAGS says otherwise."""
    import jax
    import jax.numpy as jnp
    a = jnp.ones((256, 256))
    jax.jit(lambda a: a @ a)(a).block_until_ready()
    names = []
    for task in os.listdir("/proc/self/task"):
        try:
            names.append(open(f"/proc/self/task/{task}/comm").read())
        except OSError:
            continue
    return sum("XLAEigen" in name for name in names)


def machine() -> dict:
    import jax
    cpu, isa = cpu_model_and_flags()
    versions = {"python": platform.python_version(), "jax": jax.__version__, "numpy": np.__version__}
    for name in ("torch", "transformers"):  # versions only: torch is never imported in this process
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {"cpu": cpu, "isa_flags": isa, "cores": os.cpu_count(), "load_1min": os.getloadavg()[0],
            "versions": versions, "platform": jax.devices()[0].platform,
            "xla_intra_op_threads": xla_intra_op_threads(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}


def copy_bandwidth_gb_s(size_mb: int) -> float:
    """Copy bandwidth: bytes read + written by a large array copy, best of five. Not a limit on
    what a program can stream: reading alone is cheaper than copying (decoding has exceeded it)."""
    copy, nbytes = copy_probe(size_mb)
    return nbytes / min(timed(copy) for _ in range(5)) / 1e9


# ---------------------------------------------------------------- training


def bench_train(shape, repeats: int, ref, ref_bf16: bool = True) -> dict:
    import jax
    import jax.numpy as jnp

    from gpt2train.metrics import train_flops_per_token
    from gpt2train.optimizers import make_optimizer
    from gpt2train.train import init_state, make_train_step

    L, D, H, V, B, T = shape
    fns, compile_s, mfu = {}, {}, {}
    batch_np = np.random.default_rng(0).integers(0, V, (B, T + 1))
    for precision in ("float32", "bfloat16"):
        cfg = config(L, D, H, V, B, T, precision=precision, opt_name="adamw", weight_decay=0.01)
        tx = make_optimizer(cfg)
        state = [jax.jit(lambda cfg=cfg, tx=tx: init_state(cfg, tx))()]
        step = jax.jit(make_train_step(cfg, tx), donate_argnums=0)
        batch = jnp.asarray(batch_np, jnp.int32)
        t = time.perf_counter()
        compiled = step.lower(state[0], batch).compile()
        compile_s[precision] = time.perf_counter() - t

        def run(compiled=compiled, state=state, batch=batch):
            state[0], m = compiled(state[0], batch)
            jax.block_until_ready(m)

        fns[f"ours_{precision}"] = run
        mfu[precision] = (train_flops_per_token(cfg) * B * T, cfg)
    if ref is not None:
        fns["reference"] = ref.workload("train", L, D, H, V, B, T)
        if ref_bf16:
            fns["reference_bf16"] = ref.workload("train", L, D, H, V, B, T, "bfloat16")  # torch.autocast
    probes = peak_probes(mfu)
    secs = alternate({**fns, **probes}, repeats, fastest=tuple(probes))
    out = {"shape": {"n_layer": L, "n_embd": D, "n_head": H, "n_vocab": V, "batch": B, "n_ctx": T},
           "compile_s": compile_s}
    for k, s in secs.items():
        if k not in probes:
            out[f"{k}_tok_s"] = B * T / s
    for precision, (flops, cfg) in mfu.items():
        peak = best_peak(cfg, secs)
        out[f"mfu_{precision}"] = flops / secs[f"ours_{precision}"] / peak
        out[f"peak_gflops_{precision}"] = peak / 1e9
    if ref is not None:
        out["ratio_f32"] = out["ours_float32_tok_s"] / out["reference_tok_s"]
        if ref_bf16:
            out["ratio_bf16"] = out["ours_bfloat16_tok_s"] / out["reference_bf16_tok_s"]  # against autocast
    out["bf16_over_f32"] = out["ours_bfloat16_tok_s"] / out["ours_float32_tok_s"]
    return out


# ---------------------------------------------------------------- generation


def bench_generate(shape, batches, new_tokens: int, repeats: int, ref, bandwidth_mb: int,
                   ref_bf16: bool = True) -> dict:
    """Ours, HF generate(), and two probes of what bounds decoding, all run in the same turns:
    on a machine whose speed drifts by a fifth from minute to minute, a limit measured at
    another moment would move the fraction reached by as much as the code does. The probes
    count their fastest run (the most the machine gave in those minutes: the highest limit
    and ceiling), the generators their median. Each batch size runs in float32 (rows
    `batch_B`) and in bfloat16 (`batch_B_bf16`: our weights held in bfloat16, `inference_precision:
    bfloat16`; HF's model cast to bfloat16), each against the reference in the same precision."""
    import jax

    from gpt2train.generate import Generator
    from gpt2train.inference import hold_params
    from gpt2train.sampling import SamplingOptions
    from gpt2train.tokenizer import load_tokenizer
    from gpt2train.train import initial_params

    L, D, H, V = shape
    T = 1024 if D >= 768 else 256
    tok = load_tokenizer(GPT2_ENCODER_DIR)
    prompt_ids = np.random.default_rng(0).integers(0, V, 20).tolist()
    prompt = tok.decode(prompt_ids)
    opts = SamplingOptions(length=new_tokens, temperature=0.0, stop_at_eot=False)
    out = {"shape": {"n_layer": L, "n_embd": D, "n_vocab": V}, "prompt_tokens": 20, "new_tokens": new_tokens}
    copy, copy_bytes = copy_probe(bandwidth_mb)
    steps = 16
    for precision, suffix in (("float32", ""), ("bfloat16", "_bf16")):
        cfg = config(L, D, H, V, 1, T, precision=precision)
        gen = Generator(cfg, hold_params(initial_params(cfg), cfg), tok)
        size = 2 if precision == "bfloat16" else 4
        # Bytes a step must read at the least: every weight it multiplies by (all but the position
        # table, of which it reads one row), in the dtype held; and every filled key/value slot once
        # (prompt tokens + on average half the new ones, plus the step's own), in the compute dtype.
        weight_bytes = sum(a.nbytes for k, a in jax.tree_util.tree_leaves_with_path(gen.params_for(1))
                           if "wpe" not in jax.tree_util.keystr(k))
        cache_bytes = (len(prompt_ids) + (new_tokens + 1) / 2) * H * (D // H) * size * 2 * L
        for b in batches:
            fns = {"ours": lambda b=b, gen=gen: gen.generate([prompt] * b, opts, return_tokens=True),
                   "step": context_free_step_probe(gen.params_for(b), cfg, b, steps), "copy": copy}
            if ref is not None and (precision == "float32" or ref_bf16):
                fns["reference"] = ref.workload("generate", L, D, H, V, T, [tok.encode(prompt)] * b, new_tokens,
                                                precision)
            secs = alternate(fns, repeats, fastest=("step", "copy"))
            row = {f"{k}_tok_s": b * new_tokens / secs[k] for k in ("ours", "reference") if k in secs}
            if "reference_tok_s" in row:
                row["ratio"] = row["ours_tok_s"] / row["reference_tok_s"]
            row["copy_bandwidth_gb_s"] = copy_bytes / secs["copy"] / 1e9
            row["weight_bytes_per_token"] = weight_bytes
            if b == 1:  # tokens/s if every token read all the weights once at the copy's rate
                at_copy = row["copy_bandwidth_gb_s"] * 1e9 / weight_bytes
                row["copy_bandwidth_tok_s"] = at_copy
                row["fraction_of_copy_bandwidth"] = row["ours_tok_s"] / at_copy
            row["context_free_step_ms"] = secs["step"] / steps * 1e3
            row["cache_read_ms"] = b * cache_bytes / (row["copy_bandwidth_gb_s"] * 1e9) * 1e3
            row["ceiling_tok_s"] = b / ((row["context_free_step_ms"] + row["cache_read_ms"]) / 1e3)
            row["fraction_of_ceiling"] = row["ours_tok_s"] / row["ceiling_tok_s"]
            # What memory alone allows: the weights and the filled cache read once per step at the
            # copy bandwidth, with no other work at all.
            row["bandwidth_ceiling_tok_s"] = b * row["copy_bandwidth_gb_s"] * 1e9 / (weight_bytes + b * cache_bytes)
            if "reference_tok_s" in row:
                row["ceiling_ratio"] = row["ceiling_tok_s"] / row["reference_tok_s"]
                row["bandwidth_ceiling_ratio"] = row["bandwidth_ceiling_tok_s"] / row["reference_tok_s"]
            out[f"batch_{b}{suffix}"] = row
    return out


def copy_probe(size_mb: int):
    """A function copying a size_mb array, and the bytes it moves (read + write)."""
    a = np.ones(size_mb * 2**20 // 8)
    b = np.empty_like(a)
    return (lambda: np.copyto(b, a)), 2 * a.nbytes


def context_free_step_probe(params, cfg, batch: int, steps: int):
    """A function running the model's own decode step (model.forward_cached, on the generator's
    buffers and layouts) over a one-slot cache, `steps` times in one compiled loop as the decoder
    runs it: every weight product, LayerNorm and the head, with no context to attend to. A real
    step does all of that and reads the filled cache besides, so batch / (its time / steps + one
    read of the filled cache) is a ceiling on tokens/s."""
    import jax
    import jax.numpy as jnp

    from gpt2train import model
    from gpt2train.sampling import first_argmax

    pad = jnp.zeros((batch,), jnp.int32)

    def run(params, tokens, cache):
        def step(_, carry):
            tokens, cache = carry
            logits, cache = model.forward_cached(params, tokens, cache, 0, pad, cfg)
            return first_argmax(logits[:, -1])[:, None], cache  # the next step depends on the head
        return jax.lax.fori_loop(0, steps, step, (tokens, cache))

    run = jax.jit(run)
    tokens, cache = jnp.zeros((batch, 1), jnp.int32), model.init_cache(cfg, batch, 1)
    return lambda: jax.block_until_ready(run(params, tokens, cache))


def bench_eval(shape, repeats: int, ref, ref_bf16: bool = True) -> dict:
    import jax
    import jax.numpy as jnp

    from gpt2train import model
    from gpt2train.metrics import train_flops_per_token
    from gpt2train.train import initial_params

    L, D, H, V, B, T = shape
    cfg = config(L, D, H, V, B, T)
    params = initial_params(cfg)
    tokens = np.random.default_rng(0).integers(0, V, (B, T + 1))
    batch = jnp.asarray(tokens, jnp.int32)
    fns, losses = {}, {}
    for name, precision in (("ours", "float32"), ("ours_bf16", "bfloat16")):
        c = cfg.replace(precision=precision)
        loss = jax.jit(lambda p, b, c=c: model.token_losses(p, b, c).mean())
        losses[name] = float(loss(params, batch))
        fns[name] = lambda loss=loss: jax.block_until_ready(loss(params, batch))
    if ref is not None:
        fns["reference"] = ref.workload("eval", L, D, H, V, B, T)  # the same tokens: same seed and shape
        if ref_bf16:
            fns["reference_bf16"] = ref.workload("eval", L, D, H, V, B, T, "bfloat16")  # torch.autocast
    probes = peak_probes(("float32", "bfloat16"))
    secs = alternate({**fns, **probes}, repeats, fastest=tuple(probes))
    out = {"shape": {"n_layer": L, "n_embd": D, "batch": B, "n_ctx": T},
           "loss_float32": losses["ours"], "loss_bfloat16": losses["ours_bf16"]}
    out.update({f"{k}_tok_s": B * T / s for k, s in secs.items() if k not in probes})
    # A forward pass is a third of a training step's FLOPs: 2N + 4 L T D a token (metrics.py).
    out["flops_per_token"] = train_flops_per_token(cfg) / 3
    for name, precision in (("ours", "float32"), ("ours_bf16", "bfloat16")):
        peak = best_peak(cfg.replace(precision=precision), secs)
        out[f"peak_gflops_{precision}"] = peak / 1e9
        out[f"mfu_{precision}"] = out[f"{name}_tok_s"] * out["flops_per_token"] / peak
    if ref is not None:
        out["ratio"] = out["ours_tok_s"] / out["reference_tok_s"]
        if ref_bf16:
            out["ratio_bf16"] = out["ours_bf16_tok_s"] / out["reference_bf16_tok_s"]  # same precision
    return out


# ---------------------------------------------------------------- standard tasks


def bench_tasks(shape, repeats: int, reference: bool) -> dict:
    """Items per second on LAMBADA + HellaSwag (the fixtures' 40 + 40 items): our TaskRunner
    against lm-evaluation-harness's HF backend on the same random model exported to HF format.
    Both sides have their data loaded and tokenized before timing; ours scores HellaSwag both
    ways (8 requests an item), the harness its own way (4)."""
    import subprocess
    import sys

    from gpt2train.pretrained import export_hf
    from gpt2train.tasks.run import TaskRunner
    from gpt2train.tokenizer import load_tokenizer
    from gpt2train.train import initial_params

    from gpt2train.inference import hold_params, inference_config

    L, D, H, V, B, T = shape
    cfg = config(L, D, H, V, B, T, encoder_path=GPT2_ENCODER_DIR)
    params = initial_params(cfg)
    fixtures = str(REPO / "tests" / "fixtures" / "tasks")
    tokenizer = load_tokenizer(GPT2_ENCODER_DIR)
    runner = TaskRunner(cfg, tokenizer, ["lambada", "hellaswag"], task_data=fixtures, log=lambda *a: None)
    items = sum(prepared.items for prepared, _ in runner.prepared.values())
    fns = {"ours": lambda: runner.run(params)}  # returns host floats: the device work is done
    # What `evaluate --task` runs by default: inference_precision auto (bfloat16 where the CPU has it).
    auto_cfg = inference_config(cfg)
    if auto_cfg.precision != cfg.precision:
        auto_runner = TaskRunner(auto_cfg, tokenizer, ["lambada", "hellaswag"], task_data=fixtures, log=lambda *a: None)
        auto_params = hold_params(params, auto_cfg)
        fns["ours_default"] = lambda: auto_runner.run(auto_params)
    child = None
    if reference:
        hf_dir = tempfile.mkdtemp(prefix="bench_tasks_hf_")
        export_hf(params, cfg, hf_dir, GPT2_ENCODER_DIR)
        child = subprocess.Popen([sys.executable, "-m", "bench.tasks_reference", hf_dir, fixtures, str(B)],
                                 cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        while not json.loads(child.stdout.readline()).get("ready"):
            pass

        def harness() -> float:
            child.stdin.write("time\n")
            child.stdin.flush()
            return float(json.loads(child.stdout.readline())["seconds"])
        fns["reference"] = harness
    try:
        secs = alternate(fns, repeats)
    finally:
        if child is not None:
            child.stdin.close()
            child.wait(timeout=60)
    out = {"shape": {"n_layer": L, "n_embd": D, "rows": B, "n_ctx": T}, "items": items,
           "ours_items_s": items / secs["ours"], "default_precision": auto_cfg.precision}
    out["ours_default_items_s"] = items / secs.get("ours_default", secs["ours"])
    if "reference" in secs:
        out["reference_items_s"] = items / secs["reference"]
        out["ratio_float32"] = out["ours_items_s"] / out["reference_items_s"]  # the same precision
        out["ratio"] = out["ours_default_items_s"] / out["reference_items_s"]  # each side's default
    return out


# ---------------------------------------------------------------- data and time-to-quality


def bench_data(megabytes: float) -> dict:
    import shutil

    from .data_speed import build_corpus, parquet_tokens_per_s, pipeline_tokens_per_s, shard_tokens_per_s, write_parquet

    from gpt2train.encode import encode_corpus
    work = pathlib.Path(tempfile.mkdtemp(prefix="bench_data_"))
    try:
        size = build_corpus(work / "text", megabytes)
        s = encode_corpus(str(work / "text"), str(work / "records"), "bench", GPT2_ENCODER_DIR, files_per=50,
                          minimum_size=16, workers=2, progress=False, log=lambda *_: None)
        files = [str(f) for f in sorted((work / "records").glob("*.tfrecords"))]
        encode_corpus(str(work / "text"), str(work / "shards"), "bench", GPT2_ENCODER_DIR, files_per=500,
                      minimum_size=16, workers=2, progress=False, log=lambda *_: None, fmt="bin")
        shard_files = [str(f) for f in sorted((work / "shards").glob("*.bin"))]
        parquet_files = write_parquet(work / "text", work / "parquet")
        return {"corpus_mb": size / 1e6, "encode_mb_s": s.mb_per_s, "encode_workers": 2, "tokens": s.tokens,
                "pipeline_tok_s_ctx128_b16": pipeline_tokens_per_s(files, 128, 16, seconds=3.0),
                "pipeline_tok_s_ctx1024_b8": pipeline_tokens_per_s(files, 1024, 8, seconds=3.0),
                # windows with their decoding: Parquet read and tokenized as drawn; shards memory-mapped
                "parquet_tok_s_ctx1024_b8": parquet_tokens_per_s(parquet_files, 1024, 8, seconds=3.0),
                "shards_tok_s_ctx1024_b8": shard_tokens_per_s(shard_files, 1024, 8, seconds=3.0)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def bench_time_to_quality(seconds: float, smoke: bool) -> dict:
    """Held-out bits per byte the demo recipe reaches after `seconds` of training."""
    from gpt2train.demo import build_corpus, demo_config_dict
    from gpt2train.config import Config
    from gpt2train.evaluate import evaluate_stream, token_stream
    from gpt2train.paths import expand_paths
    from gpt2train.tokenizer import train_tokenizer
    from gpt2train.train import Trainer

    work = pathlib.Path(tempfile.mkdtemp(prefix="bench_ttq_"))
    values = demo_config_dict(str(work))
    if smoke:
        values.update(n_layer=1, n_embd=32, n_head=2, n_vocab=300, n_ctx=32, eval_steps=0)
    values.update(max_steps=10**6, train_steps=10**6, eval_steps=0, checkpoint_every=10**6)
    cfg = Config(**values).validate()
    build_corpus(work, log=lambda *_: None)
    train_files = expand_paths(cfg.data_path)
    if smoke:
        train_files = train_files[:20]
        cfg = cfg.replace(data_path=train_files)
    tok = train_tokenizer(train_files, cfg.n_vocab, cfg.encoder_path)
    held_out, _ = token_stream(cfg.eval_data_path, tok)
    if smoke:
        held_out = held_out[:5000]
    trainer = Trainer(cfg, tok, progress=False, log=lambda *a, **k: None)
    result = trainer.run(until_seconds=seconds)
    after = evaluate_stream(cfg, trainer.params, tok, held_out)
    return {"seconds": seconds, "steps": result.step, "tokens_trained": result.step * cfg.train_batch_size * cfg.n_ctx,
            "heldout_bits_per_byte": after["bits_per_byte"], "heldout_perplexity": after["perplexity"],
            "recipe": {k: values[k] for k in ("n_layer", "n_embd", "n_vocab", "n_ctx", "train_batch_size", "lr")}}


# ---------------------------------------------------------------- report


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"# Benchmark report ({report['mode']})", "",
             f"{m['cpu']} ({', '.join(m['isa_flags']) or 'none of ' + ', '.join(ISA_FLAGS)}), {m['cores']} cores, "
             f"load {m['load_1min']:.2f} at start; "
             + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
             + f"; copy bandwidth {report['copy_bandwidth_gb_s']:.1f} GB/s; total {report['seconds']:.0f} s.", "",
             f"Threads: ours (XLA:CPU) {m['xla_intra_op_threads']} intra-op"
             + (f" (XLA_FLAGS {m['xla_flags']})" if m["xla_flags"] else "")]
    ref = m.get("reference")
    if ref:
        lines[-1] += (f"; reference (PyTorch) {ref['intra_op_threads']} intra-op, {ref['inter_op_threads']} "
                      f"inter-op, BLAS {ref['blas']}, CPU kernels {ref['cpu_capability']}.")
    lines.append("")
    r = report["results"]
    for name in ("train_small", "train_124M"):
        if name in r:
            t = r[name]
            lines += [f"## Training, {name[6:]} ({t['shape']})", "",
                      "| | tokens/s | vs the reference in the same precision | MFU | compile |",
                      "| --- | --- | --- | --- | --- |"]
            for p, ref_key in (("float32", "reference_tok_s"), ("bfloat16", "reference_bf16_tok_s")):
                ref = t.get(ref_key)
                ratio = f"{t[f'ours_{p}_tok_s'] / ref:.2f}x" if ref else "n/a"
                lines.append(f"| ours {p} | {t[f'ours_{p}_tok_s']:,.0f} | {ratio} | {t[f'mfu_{p}']:.1%} of "
                             f"{t[f'peak_gflops_{p}']:.0f} GFLOP/s | {t['compile_s'][p]:.1f} s |")
            if t.get("reference_tok_s"):
                lines.append(f"| HF GPT-2 + torch AdamW, float32 | {t['reference_tok_s']:,.0f} | | | |")
            if t.get("reference_bf16_tok_s"):
                lines.append(f"| HF GPT-2 + torch AdamW, torch.autocast(bfloat16) | {t['reference_bf16_tok_s']:,.0f} | | | |")
            lines += [f"\nbf16 / f32: {t['bf16_over_f32']:.2f}x", ""]
    if "generate" in r:
        g = r["generate"]
        lines += [f"## Generation ({g['shape']}, greedy, {g['prompt_tokens']}-token prompt + {g['new_tokens']} new)",
                  "", "Each row against HF `generate` in the same precision (bfloat16: our weights held in bfloat16, "
                  "HF's model cast to bfloat16); the last column is the tokens/s of reading the weights a step reads, in that "
                  "precision, once per token at the copy bandwidth: a yardstick, not a limit.", "",
                  "| batch | precision | ours tokens/s | HF generate tokens/s | ratio | weights read at copy bandwidth |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for key, row in g.items():
            if key.startswith("batch_"):
                lim = (f"{row['copy_bandwidth_tok_s']:.1f} tok/s at {row['copy_bandwidth_gb_s']:.1f} GB/s "
                       f"(ours {row['fraction_of_copy_bandwidth']:.0%} of copy bandwidth)"
                       if "copy_bandwidth_tok_s" in row else "")
                batch, _, bf16 = key[6:].partition("_")
                lines.append(f"| {batch} | {'bfloat16' if bf16 else 'float32'} | {row['ours_tok_s']:.1f} | "
                             f"{row.get('reference_tok_s', float('nan')):.1f} | {row.get('ratio', float('nan')):.2f}x | {lim} |")
        lines += ["", "No decode step can be faster than the model's own decode step with no context (its weight products, "
                  "LayerNorms and head over a one-slot cache, on the generator's own buffers) plus one read of the filled "
                  "key/value cache at the measured copy bandwidth. Both were measured in the same turns as the generators. "
                  "And no step can read its weights and the filled cache faster than the copy bandwidth (the memory-only "
                  "ceiling: those bytes at that rate, nothing else done):",
                  "", "| batch | step without context | + filled cache read once | ceiling tokens/s | ours, of the ceiling "
                  "| ceiling vs HF | memory-only ceiling tokens/s | its ratio to HF |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for key, row in g.items():
            if key.startswith("batch_") and "context_free_step_ms" in row:
                lines.append(f"| {key[6:]} | {row['context_free_step_ms']:.1f} ms | {row['cache_read_ms']:.1f} ms | "
                             f"{row['ceiling_tok_s']:.1f} | {row['fraction_of_ceiling']:.0%} | "
                             f"{row.get('ceiling_ratio', float('nan')):.2f}x | "
                             f"{row.get('bandwidth_ceiling_tok_s', float('nan')):.1f} | "
                             f"{row.get('bandwidth_ceiling_ratio', float('nan')):.2f}x |")
        lines.append("")
    if "eval" in r:
        e = r["eval"]
        lines += [f"## Evaluation, forward only ({e['shape']})", "",
                  f"ours {e['ours_tok_s']:,.0f} tokens/s (MFU {e['mfu_float32']:.0%}); HF "
                  f"{e.get('reference_tok_s', float('nan')):,.0f}; ratio {e.get('ratio', float('nan')):.2f}x", "",
                  f"ours with `precision: bfloat16` {e['ours_bf16_tok_s']:,.0f} tokens/s (MFU {e['mfu_bfloat16']:.0%} "
                  "of the bf16 peak); HF under "
                  f"torch.autocast(bfloat16) {e.get('reference_bf16_tok_s', float('nan')):,.0f}; ratio "
                  f"{e.get('ratio_bf16', float('nan')):.2f}x (loss {e['loss_bfloat16']:.4f} against "
                  f"{e['loss_float32']:.4f} in float32, on near-uniform random weights: not an accuracy "
                  "check; tests/test_model.py compares bf16 with float32)", ""]
    if "tasks" in r:
        k = r["tasks"]
        lines += [f"## Standard tasks, LAMBADA + HellaSwag fixtures ({k['items']} items, {k['shape']})", "",
                  f"ours {k['ours_items_s']:.2f} items/s in float32, {k['ours_default_items_s']:.2f} in its default "
                  f"precision here ({k['default_precision']}); lm-evaluation-harness HF backend (float32, its default) "
                  f"{k.get('reference_items_s', float('nan')):.2f} items/s; ratio {k.get('ratio_float32', float('nan')):.2f}x "
                  f"in float32, {k.get('ratio', float('nan')):.2f}x each in its default", ""]
    if "data" in r:
        d = r["data"]
        lines += ["## Data", "", f"encode {d['encode_mb_s']:.2f} MB/s ({d['encode_workers']} workers, "
                  f"{d['corpus_mb']:.0f} MB); record input pipeline {d['pipeline_tok_s_ctx128_b16']:,.0f} tokens/s "
                  f"(ctx 128 x 16), {d['pipeline_tok_s_ctx1024_b8']:,.0f} tokens/s (ctx 1024 x 8)", "",
                  f"Parquet input (read and tokenized as drawn) {d['parquet_tok_s_ctx1024_b8']:,.0f} tokens/s, "
                  f"llm.c shards (bin input) {d['shards_tok_s_ctx1024_b8']:,.0f} tokens/s (ctx 1024 x 8)", ""]
    if "ttq" in r:
        q = r["ttq"]
        lines += ["## Time to quality", "", f"demo recipe {q['recipe']}: {q['steps']} steps in {q['seconds']:.0f} s -> "
                  f"held-out {q['heldout_bits_per_byte']:.3f} bits/byte (perplexity {q['heldout_perplexity']:.1f})", ""]
    checks = target_checks(r)
    if checks:
        lines += ["## Targets", "", "| target | this run | | what bounds it when missed |", "| --- | --- | --- | --- |"]
        for name, value, goal, met, bound in checks:
            lines.append(f"| {name} >= {goal:g} | {value:.3f} | {'met' if met else 'not met'} | {'' if met else bound} |")
        lines += ["", "The profiles and measurements behind these bounds: README.md, \"Speed today\".", ""]
    lines += ["FLOPs per token: 6N + 12 L T D (N = parameters in matmuls, the tied head once); MFU is against this",
              "machine's matmul peak measured in the same precision: the fastest 2048 x 2048 x 2048 product, of ten at",
              "the first use (gpt2train/metrics.py, peak_flops_per_device) and one in each turn of the benchmark."]
    return "\n".join(lines) + "\n"


# What the performance issues ask for, and what the profiles showed to bound each figure on XLA:CPU.
TARGETS = [
    ("train_small", "ratio_f32", "training small, float32 vs reference", 1.0,
     lambda r: "the tied head over 50,257 words, nearly 90% of this shape's FLOPs, its float32 products XLA:CPU's; "
               + _training_bound(r, "train_small", 1.0)),
    ("train_124M", "ratio_f32", "training 124M, float32 vs reference", 1.2,
     lambda r: _training_bound(r, "train_124M", 1.2)),
    ("train_124M", "ratio_bf16", "training 124M, bfloat16 vs torch.autocast(bfloat16)", 1.5,
     "XLA:CPU's bfloat16 products on this CPU (see the MFU against the bfloat16 peak)"),
    ("train_124M", "mfu_bfloat16", "training 124M, bfloat16 MFU of the bfloat16 peak", 0.5,
     "what bf16 does not speed up: AdamW's float32 update (memory-bound), the gradient norm, GELU, conversions "
     "and the gaps between operations; and the products themselves, by 32 x 32 tile blocks, at ~75% of the "
     "2048-cube peak (README)"),
    ("generate", "batch_1.ratio", "generation batch 1 vs reference, float32", 2.0,
     lambda r: "memory bandwidth: " + _bandwidth_bound(r, "batch_1")),
    ("generate", "batch_1.fraction_of_copy_bandwidth", "generation batch 1, float32, fraction of copy bandwidth",
     0.8, lambda r: "the streaming rate of XLA:CPU's matrix-vector products: a decode step with no context takes "
                    f"{r['generate']['batch_1']['context_free_step_ms']:.1f} ms per token"),
    ("generate", "batch_8.ratio", "generation batch 8 vs reference, float32", 4.0,
     lambda r: "memory bandwidth: " + _bandwidth_bound(r, "batch_8") + "; and the model's own step (the [8, K] x "
               "[K, N] float32 products, LayerNorms, head): a decode step with no "
               f"context takes {r['generate']['batch_8']['context_free_step_ms']:.1f} ms, a ceiling of "
               f"{r['generate']['batch_8'].get('ceiling_ratio', float('nan')):.2f}x the reference"),
    ("generate", "batch_1_bf16.ratio", "generation batch 1, bfloat16 vs HF's bfloat16 generate", 1.5,
     lambda r: "memory bandwidth: " + _bandwidth_bound(r, "batch_1_bf16")),
    ("generate", "batch_1_bf16.fraction_of_copy_bandwidth",
     "generation batch 1, bfloat16, fraction of copy bandwidth (bfloat16 weights)", 0.8,
     lambda r: f"a step with no context takes {r['generate']['batch_1_bf16']['context_free_step_ms']:.1f} ms, "
               f"against {r['generate']['batch_1_bf16']['weight_bytes_per_token'] / r['generate']['batch_1_bf16']['copy_bandwidth_gb_s'] / 1e6:.1f}"
               " ms to read its weights at the copy bandwidth"),
    ("generate", "batch_8_bf16.ratio", "generation batch 8, bfloat16 vs HF's bfloat16 generate", 3.0,
     lambda r: "memory bandwidth: " + _bandwidth_bound(r, "batch_8_bf16") + "; a step with no context takes "
               f"{r['generate']['batch_8_bf16']['context_free_step_ms']:.1f} ms, a ceiling of "
               f"{r['generate']['batch_8_bf16'].get('ceiling_ratio', float('nan')):.2f}x the reference"),
    ("eval", "ratio", "evaluation 8 x 1024 vs reference, float32", 1.5, lambda r: _compute_bound(r, "float32")),
    ("eval", "ratio_bf16", "evaluation 8 x 1024, bfloat16 vs torch.autocast(bfloat16)", 1.5,
     lambda r: _compute_bound(r, "bfloat16") + "; on CPUs with AVX-512 BF16 or AMX the layer products, attention "
               "and the head's losses run on our compiled kernels, elsewhere on XLA:CPU's bfloat16 products"),
    ("tasks", "ratio", "task items/s vs lm-evaluation-harness, each in its default precision", 2.0,
     "HellaSwag scored both ways (twice the harness's requests), and float32 products slower in XLA:CPU than in MKL"),
]


def _compute_bound(results: dict, precision: str) -> str:
    """How far the evaluation target is from this machine's measured matmul peak in precision."""
    e = results["eval"]
    reference = e["reference_tok_s" if precision == "float32" else "reference_bf16_tok_s"]
    needed = 1.5 * reference * e["flops_per_token"] / 1e9
    peak = e[f"peak_gflops_{precision}"]
    return (f"{precision} compute: 1.5x the reference needs {needed:,.0f} GFLOP/s ({e['flops_per_token'] / 1e6:.0f} "
            f"MFLOP a token, 2N + 4 L T D), {needed / peak:.0%} of this machine's {precision} matmul peak "
            f"({peak:,.0f} GFLOP/s); ours runs at {e[f'mfu_{precision}']:.0%} of it")


def _training_bound(results: dict, name: str, goal: float) -> str:
    """How far a float32 training target is from this machine's measured float32 matmul peak."""
    t = results[name]
    mfu = t["mfu_float32"]
    needed = mfu * goal * t["reference_tok_s"] / t["ours_float32_tok_s"]  # the MFU the goal takes
    return (f"float32 compute: {goal:g}x the reference needs {needed:.0%} of this machine's float32 matmul peak "
            f"({t['peak_gflops_float32']:,.0f} GFLOP/s, 6N + 12 L T D FLOPs a token); ours runs at {mfu:.0%} of it")


def _bandwidth_bound(results: dict, row: str) -> str:
    r = results["generate"][row]
    return (f"reading the weights and the filled cache once per step at the copy bandwidth "
            f"({r['copy_bandwidth_gb_s']:.1f} GB/s), with no other work, allows {r['bandwidth_ceiling_tok_s']:.0f} "
            f"tokens/s, {r.get('bandwidth_ceiling_ratio', float('nan')):.2f}x the reference")


def target_checks(results: dict) -> list:
    out = []
    for bench, key, name, goal, bound in TARGETS:
        value = results.get(bench)
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, (int, float)):
            if callable(bound):
                try:
                    bound = bound(results)
                except (KeyError, TypeError):
                    bound = "(see README)"
            out.append((name, value, goal, value >= goal, bound))
    return out


def main(argv=None) -> dict:
    if argv is None:  # measure what users get: the entry points keep XLA's buffers mapped (host_memory.py)
        from gpt2train.host_memory import reexec_with_resident_heap
        reexec_with_resident_heap()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true")
    mode.add_argument("--smoke", action="store_true")
    p.add_argument("--only", default="train,generate,eval,data,ttq", help="comma list of benchmarks (tasks: also available, not run by default)")
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    p.add_argument("--no-reference", action="store_true", help="skip the PyTorch side (no torch installed)")
    # On a CPU without bfloat16 arithmetic (AVX2 alone) PyTorch's autocast(bfloat16) training step
    # at 124M had not finished three repeats in 30 minutes: such a machine can leave it out.
    p.add_argument("--no-reference-bf16", action="store_true",
                   help="run PyTorch in float32 only (its bfloat16 is very slow without AVX-512 BF16 or AMX)")
    args = p.parse_args(argv)
    mode_name = "smoke" if args.smoke else "quick" if args.quick else "full"
    sizes = SIZES["smoke" if args.smoke else "full"]
    repeats = 1 if args.smoke else 3 if args.quick else 5
    ref = Reference() if not args.no_reference and reference_available() else None
    only = set(args.only.split(","))
    start = time.time()
    report = {"mode": mode_name, "machine": machine(),
              "copy_bandwidth_gb_s": copy_bandwidth_gb_s(64 if args.smoke else 1024), "results": {}}
    if ref is not None:
        report["machine"]["reference"] = ref.info()
    r = report["results"]

    def log(msg):
        print(f"[{time.time() - start:6.0f} s] {msg}", flush=True)
        if r:  # what has been measured so far survives a later benchmark's crash
            report["seconds"] = time.time() - start
            write_report(report, markdown(report), pathlib.Path(args.out), "report", quiet=True)
    if "train" in only:
        for name in ("train_small", "train_124M"):
            log(f"training {name}")
            r[name] = bench_train(sizes[name], repeats, ref, not args.no_reference_bf16)
    if "generate" in only:
        log("generation")
        new = 8 if args.smoke else 200
        r["generate"] = bench_generate(sizes["gen"], (1, 8) if not args.smoke else (1, 2), new, repeats, ref,
                                       64 if args.smoke else 1024, not args.no_reference_bf16)
    if "eval" in only:
        log("evaluation")
        r["eval"] = bench_eval(sizes["eval"], repeats, ref, not args.no_reference_bf16)
    if "tasks" in only:  # not in the default list: --only tasks (it needs lm-eval for its reference)
        log("standard tasks")
        r["tasks"] = bench_tasks(sizes["tasks"], repeats, not args.no_reference and tasks_reference_available())
    if "data" in only:
        log("data")
        r["data"] = bench_data(0.3 if args.smoke else 10 if args.quick else 50)
    if "ttq" in only:
        log("time to quality")
        r["ttq"] = bench_time_to_quality(3 if args.smoke else 60 if args.quick else 120, args.smoke)
    if ref is not None:
        ref.close()
    report["seconds"] = time.time() - start
    write_report(report, markdown(report), pathlib.Path(args.out), "report")
    return report


def write_report(report: dict, text: str, out: pathlib.Path, stem: str, quiet: bool = False) -> None:
    """STEM.json and STEM.md in `out`, and (unless quiet) the Markdown on the terminal."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1))
    (out / f"{stem}.md").write_text(text)
    if not quiet:
        print(text)


if __name__ == "__main__":
    main()
