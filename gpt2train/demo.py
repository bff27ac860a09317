"""The built-in demo: a corpus every machine has (Python's standard library), a tokenizer trained
on it, a small GPT-2 trained for a few CPU minutes, held-out perplexity before and after, and a
sample. Everything lands in one working directory; rerunning reuses what is already there
(corpus, tokenizer, and the training run, which resumes).
"""

from __future__ import annotations

import json
import os
import shutil
import sysconfig
import time
import zlib
from pathlib import Path


from .config import load_config

# The demo's config. configs/demo.json is this with the default working directory `demo_run`.
DEMO_CONFIG = {
    "model": "GPT2", "n_ctx": 128, "n_embd": 128, "n_layer": 2, "n_head": 4, "n_vocab": 2048,
    "input": "text", "precision": "bfloat16",
    "lr": 2e-3, "warmup_steps": 100, "opt_name": "adam", "weight_decay": 0.1,
    "beta1": 0.9, "beta2": 0.98, "epsilon": 1e-8, "grad_clip": 1.0, "min_lr_ratio": 0.1,
    "train_steps": 200, "eval_steps": 8, "max_steps": 1600, "iterations": 50,
    "embed_dropout": 0.0, "attn_dropout": 0.0, "res_dropout": 0.0,
    "scale_by_depth": True, "scale_by_in": False,
    "train_batch_size": 16, "eval_batch_size": 32, "predict_batch_size": 1, "seed": 0,
}
PATH_KEYS = {"data_path": "corpus/train", "eval_data_path": "corpus/eval", "encoder_path": "encoder",
             "model_path": "model", "predict_path": "predictions.txt"}
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__", "lib2to3",
             "turtledemo", "ensurepip", "tkinter", "pydoc_data", "config-3"}
HOLDOUT_EVERY = 20  # about 5% of the files, chosen by a hash of their path, are held out
PROMPT = "def main(argv):\n"


def demo_config_dict(workdir: str) -> dict:
    return {**DEMO_CONFIG, **{k: f"{workdir.rstrip('/')}/{v}" for k, v in PATH_KEYS.items()}}


def stdlib_sources() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("config-"))
        files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py")]
    return files


def build_corpus(workdir: Path, log=print) -> tuple[int, int]:
    """Copy the standard library's .py files into corpus/train and corpus/eval (flat names)."""
    train, held = workdir / "corpus" / "train", workdir / "corpus" / "eval"
    if train.is_dir() and held.is_dir() and any(train.iterdir()):
        return len(list(train.iterdir())), len(list(held.iterdir()))
    root = Path(sysconfig.get_paths()["stdlib"])
    tmp = workdir / "corpus.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "train").mkdir(parents=True)
    (tmp / "eval").mkdir(parents=True)
    counts = [0, 0]
    for src in stdlib_sources():
        rel = src.relative_to(root).as_posix()
        try:
            text = src.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a few stdlib files are deliberately not UTF-8
        if not text.strip():
            continue
        is_eval = zlib.crc32(rel.encode()) % HOLDOUT_EVERY == 0
        (tmp / ("eval" if is_eval else "train") / rel.replace("/", "__")).write_text(text, encoding="utf-8")
        counts[is_eval] += 1
    shutil.rmtree(workdir / "corpus", ignore_errors=True)
    tmp.rename(workdir / "corpus")  # appears whole or not at all
    log(f"corpus: {counts[0]} training files and {counts[1]} held-out files from {root}")
    return counts[0], counts[1]


def run_demo(workdir: str = "demo_run", *, steps: int | None = None, extra: dict | None = None,
             log=print) -> dict:
    from .evaluate import evaluate_stream, token_stream
    from .generate import Generator, append_samples, format_sample
    from .sampling import SamplingOptions
    from .paths import expand_paths
    from .tokenizer import load_tokenizer, train_tokenizer
    from .train import Trainer, initial_params

    t0 = time.time()
    wd = Path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    config_path = wd / "demo.json"
    cfg_dict = demo_config_dict(workdir)
    if steps is not None:
        cfg_dict["max_steps"] = steps
    config_path.write_text(json.dumps(cfg_dict, indent=2) + "\n")
    cfg = load_config(str(config_path), extra or {})

    build_corpus(wd, log)
    enc_dir = Path(cfg.encoder_path)
    if (enc_dir / "encoder.json").exists():
        tok = load_tokenizer(cfg.encoder_path)
    else:
        log(f"training a {cfg.n_vocab}-token BPE vocabulary on the training files ...")
        tok = train_tokenizer(expand_paths(cfg.data_path), cfg.n_vocab, cfg.encoder_path)

    held_out, _ = token_stream(cfg.eval_data_path, tok)  # tokenized once, scored before and after
    before = evaluate_stream(cfg, initial_params(cfg), tok, held_out)
    log(f"held-out before training: perplexity {before['perplexity']:.1f}, "
        f"{before['bits_per_byte']:.3f} bits/byte ({before['tokens']} tokens)")

    log(f"training {cfg.n_layer} layers x {cfg.n_embd} wide, context {cfg.n_ctx}, for {cfg.max_steps} steps ...")
    trainer = Trainer(cfg, tok, log=log)
    trainer.run()
    after = evaluate_stream(cfg, trainer.params, tok, held_out)
    log(f"held-out after training:  perplexity {after['perplexity']:.2f}, "
        f"{after['bits_per_byte']:.3f} bits/byte (untrained: {before['perplexity']:.1f}, "
        f"{before['bits_per_byte']:.3f})")

    gen = Generator(cfg, trainer.params, tok)
    length = cfg.n_ctx - len(tok.encode(PROMPT))  # as much as the context holds
    opts = SamplingOptions(length=length, temperature=0.8, top_k=40, seed=cfg.seed)
    text = gen.generate([PROMPT], opts)[0]
    append_samples(cfg.resolved_predict_path, [PROMPT + text])
    log(format_sample(0, PROMPT + text), end="")
    summary = {"perplexity_before": before["perplexity"], "perplexity_after": after["perplexity"],
               "bpb_before": before["bits_per_byte"], "bpb_after": after["bits_per_byte"],
               "steps": trainer.step, "seconds": time.time() - t0, "sample": text}
    (wd / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(f"done in {summary['seconds']:.0f} s. Continue with:\n"
        f"  python3 main.py --model {config_path} --predict_text 'import os' --top_k 40\n"
        f"  python3 -m gpt2train evaluate --model {config_path}")
    return summary
