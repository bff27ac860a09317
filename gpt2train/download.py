"""`download`: a pretrained GPT-2 (by name or from a local directory) -> our checkpoint + a config.

The model lands in OUT/<name>/ as a parameters-only checkpoint (checkpoints/0), its
vocabulary in OUT/encoder/ (GPT-2's) or OUT/<name>/encoder/ (the directory's own), and a
ready config OUT/<name>/config.json whose path is printed last: `main.py --model <it>
--predict_text ...` samples at once, and training with it fine-tunes (fresh optimizer, step 0).
"""

from __future__ import annotations

import json
import os
import shutil

from gpt2train.errors import UserError


def _copy_vocabulary(src: str, dst: str) -> bool:
    """Copy a checkpoint directory's own vocabulary (OpenAI or HF names) into dst, if it has one."""
    for enc, merges in (("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt")):
        if os.path.isfile(os.path.join(src, enc)) and os.path.isfile(os.path.join(src, merges)):
            os.makedirs(dst, exist_ok=True)
            shutil.copyfile(os.path.join(src, enc), os.path.join(dst, "encoder.json"))
            shutil.copyfile(os.path.join(src, merges), os.path.join(dst, "vocab.bpe"))
            return True
    return False


def download(source: str, out: str = "models", log=print) -> str:
    """Fetch or convert `source`; returns the path of the written config."""
    from gpt2train import hub
    from gpt2train.checkpoint import Checkpointer
    from gpt2train.config import Config
    from gpt2train.pretrained import fit, kind_of, load_pretrained, config_from_shape
    from gpt2train.tokenizer import copy_gpt2_encoder

    if source == "encoder":
        path = copy_gpt2_encoder(os.path.join(out, "encoder"))
        log(f"wrote GPT-2's encoder.json and vocab.bpe to {path}")
        return path
    if os.path.isdir(source):
        kind_of(source)  # a clear error before anything is written
        name = os.path.basename(os.path.normpath(source))
        local = source
    elif source in hub.MODELS:
        name = hub.canonical(source)
        local = hub.fetch_model(name)
    else:
        raise UserError(f"{source!r} is neither a model name ({', '.join(hub.REPOS)}, 117M, 345M, encoder) "
                        "nor a directory: check the spelling or the path")
    model_dir = os.path.abspath(os.path.join(out, name))
    if os.path.exists(os.path.join(model_dir, "checkpoints")):
        raise UserError(f"{model_dir} already holds a model: remove it or choose another --out")
    pre = load_pretrained(local)
    encoder_dir = os.path.join(model_dir, "encoder")
    if not _copy_vocabulary(local, encoder_dir):
        if pre.shape["n_vocab"] != 50257:
            raise UserError(f"{source} has no vocabulary files (encoder.json + vocab.bpe, or vocab.json + merges.txt) "
                            f"and its {pre.shape['n_vocab']} tokens are not GPT-2's 50257: add them to the directory")
        encoder_dir = os.path.abspath(os.path.join(out, "encoder"))
        if not os.path.isfile(os.path.join(encoder_dir, "encoder.json")):
            copy_gpt2_encoder(encoder_dir)
    values = config_from_shape(pre.shape, model_path=model_dir, encoder_path=os.path.abspath(encoder_dir),
                               data_path="", eval_data_path=None,
                               predict_path=os.path.join(model_dir, "predictions.txt"))
    cfg = Config(**values).validate()
    ckpt = Checkpointer(cfg)
    ckpt.save(0, {"params": fit(pre, cfg)}, {}, kind="pretrained")
    ckpt.close()
    config_path = os.path.join(model_dir, "config.json")
    with open(config_path, "w") as f:
        json.dump(cfg.to_dict(), f, indent=1)
    log(f"converted {pre.source} ({', '.join(f'{k}={v}' for k, v in pre.shape.items())}) into {model_dir}")
    log(config_path)
    return config_path
