"""The model card (README.md) of an exported model: what it is, how it was trained (config, data,
steps, tokens), its last held-out figures and its training curves, and how to load it.
"""

from __future__ import annotations

import json
import posixpath

import fsspec

from .config import Config

# The keys a reader needs to know how the model was made (the rest stay in the checkpoint).
CARD_KEYS = ("n_layer", "n_embd", "n_head", "n_ctx", "n_vocab", "init_from", "data_path", "eval_data_path",
             "train_batch_size", "max_steps", "lr", "warmup_steps", "min_lr_ratio", "opt_name", "weight_decay",
             "grad_clip", "precision", "seed")


def last_eval(model_path: str, step: int) -> dict | None:
    """The newest evaluation record at or before `step` in the run's metrics.jsonl."""
    fs, path = fsspec.core.url_to_fs(model_path.rstrip("/") + "/metrics.jsonl")
    if not fs.exists(path):
        return None
    found = None
    with fs.open(path, "r", encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if "eval_loss" in record and record.get("step", step + 1) <= step:
                found = record
    return found


def model_card(cfg: Config, step: int, repo_id: str | None, params: int, *, curves: bool) -> str:
    name = repo_id or posixpath.basename(cfg.model_path.rstrip("/")) or "model"
    tokens = step * cfg.train_batch_size * cfg.n_ctx
    start = f"fine-tuned from `{cfg.init_from}`" if cfg.init_from else "trained from scratch"
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags:", "- gpt2", "- gpt2train",
             "---", "", f"# {name}", "",
             f"A GPT-2 language model of {params / 1e6:.1f}M parameters ({cfg.n_layer} layers, {cfg.n_embd} wide, "
             f"{cfg.n_head} heads, a {cfg.n_ctx}-token context), {start} with gpt2train for {step:,} steps "
             f"({tokens:,} tokens).", "", "## Training", "", "| key | value |", "| --- | --- |"]
    values = cfg.to_dict()
    lines += [f"| `{k}` | `{json.dumps(values[k])}` |" for k in CARD_KEYS]
    ev = last_eval(cfg.model_path, step)
    lines += ["", "## Evaluation", ""]
    if ev is not None:
        lines += [f"On the held-out data (`eval_data_path`, {cfg.eval_steps} batches of {cfg.eval_batch_size}) at "
                  f"step {ev['step']:,}: loss **{ev['eval_loss']:.4f}** nats/token, perplexity **{ev['eval_ppl']:.2f}**."]
    else:
        lines += ["The run logged no evaluation (it had no `eval_data_path`)."]
    if curves:
        lines += ["", "## Training curves", "", "![training curves](curves.png)"]
    lines += ["", "## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              f'model = AutoModelForCausalLM.from_pretrained("{name}")',
              f'tokenizer = AutoTokenizer.from_pretrained("{name}")',
              'ids = tokenizer("Hello", return_tensors="pt").input_ids',
              "print(tokenizer.decode(model.generate(ids, max_new_tokens=40, do_sample=True)[0]))", "```", "",
              f"To train it on with gpt2train, set `\"init_from\": \"{name}\"` in a config.", ""]
    return "\n".join(lines)


def write_model_card(out_dir: str, cfg: Config, step: int, repo_id: str | None, params: int) -> None:
    """README.md in the export directory, and the run's curves.png beside it when there is one."""
    fs, root = fsspec.core.url_to_fs(out_dir)
    src_fs, curves = fsspec.core.url_to_fs(cfg.model_path.rstrip("/") + "/curves.png")
    has_curves = src_fs.exists(curves)
    if has_curves:
        with src_fs.open(curves, "rb") as src, fs.open(posixpath.join(root, "curves.png"), "wb") as dst:
            dst.write(src.read())
    with fs.open(posixpath.join(root, "README.md"), "w", encoding="utf-8") as f:
        f.write(model_card(cfg, step, repo_id, params, curves=has_curves))
