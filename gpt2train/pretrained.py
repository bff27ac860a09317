"""Pretrained GPT-2 in, our model out, and back: HF safetensors, OpenAI's TF checkpoints, export.

A pretrained source is loaded into `Pretrained`: numpy arrays in our layout (see model.py;
vocabulary not yet padded) plus its shape. Sources:
  - an HF directory: config.json (model_type gpt2) + model.safetensors, or sharded with
    model.safetensors.index.json;
  - an OpenAI directory: hparams.json + model.ckpt.index/.data-* (read without TensorFlow);
  - one of our converted models: a config.json of ours + checkpoints/ (what `download` writes).
`fit` then checks the shape against a config and adapts it (shorter n_ctx, padded vocabulary).
"""

from __future__ import annotations

import json
import os
import posixpath
from dataclasses import dataclass

import fsspec
import numpy as np

from gpt2train.config import SHAPE_KEYS
from gpt2train.errors import UserError

# Our block parameter -> (HF name inside transformer.h.{i}, OpenAI name inside model/h{i}): the
# same path in both, with HF's "weight"/"bias" and OpenAI's "g"/"b"/"w" as the last part.
_HF_LEAF = {"scale": "weight", "kernel": "weight", "bias": "bias"}
_OPENAI_LEAF = {"scale": "g", "kernel": "w", "bias": "b"}
BLOCK_NAMES = {
    (*module, leaf): (".".join((*module, _HF_LEAF[leaf])), "/".join((*module, _OPENAI_LEAF[leaf])))
    for module, leaves in ((("ln_1",), ("scale", "bias")), (("attn", "c_attn"), ("kernel", "bias")),
                           (("attn", "c_proj"), ("kernel", "bias")), (("ln_2",), ("scale", "bias")),
                           (("mlp", "c_fc"), ("kernel", "bias")), (("mlp", "c_proj"), ("kernel", "bias")))
    for leaf in leaves
}
TOP_NAMES = {  # ours -> (HF, OpenAI)
    ("wte",): ("wte.weight", "model/wte"),
    ("wpe",): ("wpe.weight", "model/wpe"),
    ("ln_f", "scale"): ("ln_f.weight", "model/ln_f/g"),
    ("ln_f", "bias"): ("ln_f.bias", "model/ln_f/b"),
}


@dataclass
class Pretrained:
    params: dict  # our pytree of numpy float32 arrays, vocabulary unpadded
    shape: dict  # n_vocab n_ctx n_embd n_layer n_head
    source: str


def expected_shapes(shape: dict) -> dict[tuple, tuple]:
    V, T, D, L = shape["n_vocab"], shape["n_ctx"], shape["n_embd"], shape["n_layer"]
    per_block = {
        ("ln_1", "scale"): (D,), ("ln_1", "bias"): (D,), ("ln_2", "scale"): (D,), ("ln_2", "bias"): (D,),
        ("attn", "c_attn", "kernel"): (D, 3 * D), ("attn", "c_attn", "bias"): (3 * D,),
        ("attn", "c_proj", "kernel"): (D, D), ("attn", "c_proj", "bias"): (D,),
        ("mlp", "c_fc", "kernel"): (D, 4 * D), ("mlp", "c_fc", "bias"): (4 * D,),
        ("mlp", "c_proj", "kernel"): (4 * D, D), ("mlp", "c_proj", "bias"): (D,),
    }
    top = {("wte",): (V, D), ("wpe",): (T, D), ("ln_f", "scale"): (D,), ("ln_f", "bias"): (D,)}
    return {**top, **{("h", *k): (L, *v) for k, v in per_block.items()}}


def _set(tree: dict, path: tuple, value) -> None:
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
    tree[path[-1]] = value


def _get(tree: dict, path: tuple):
    for part in path:
        tree = tree[part]
    return tree


NAMINGS = ("hf", "openai")  # the two columns of BLOCK_NAMES and TOP_NAMES


def build_params(get, shape: dict, source: str, naming: str) -> dict:
    """Our pytree from a tensor getter `get(name)` of a checkpoint with "hf" or "openai" tensor names.

    Every tensor is checked against the shape the model needs; a missing or misshapen tensor
    is an error that names it.
    """
    want = expected_shapes(shape)
    column = NAMINGS.index(naming)
    params: dict = {}

    def fetch(name: str, need: tuple) -> np.ndarray:
        try:
            array = np.asarray(get(name), dtype=np.float32)
        except KeyError:
            raise UserError(f"{source}: tensor {name!r} is missing: the checkpoint is not a complete GPT-2") from None
        if naming == "openai" and array.ndim == len(need) + 1 and array.shape[0] == 1:
            array = array[0]  # OpenAI's matmul weights are [1, in, out] convolution kernels
        if array.shape != need:
            raise UserError(f"{source}: tensor {name!r} has shape {array.shape} but this GPT-2 "
                            f"({', '.join(f'{k}={shape[k]}' for k in SHAPE_KEYS)}) needs {need}")
        return array

    for ours, names in TOP_NAMES.items():
        _set(params, ours, fetch(names[column], want[ours]))
    for ours, names in BLOCK_NAMES.items():
        layers = []
        for i in range(shape["n_layer"]):
            name = f"h.{i}.{names[0]}" if naming == "hf" else f"model/h{i}/{names[1]}"
            layers.append(fetch(name, want[("h", *ours)][1:]))
        _set(params, ("h", *ours), np.stack(layers))
    return params


# ---------------------------------------------------------------- sources


def _read_json(fs, path: str) -> dict:
    with fs.open(path, "r") as f:
        return json.load(f)


def kind_of(directory: str) -> str:
    fs, root = fsspec.core.url_to_fs(directory)
    if not fs.isdir(root):
        raise UserError(f"pretrained model {directory!r} is not a directory: give a model name "
                        f"(124M 355M 774M 1558M) or a directory with a GPT-2 checkpoint")
    if fs.exists(posixpath.join(root, "hparams.json")) and fs.exists(posixpath.join(root, "model.ckpt.index")):
        return "openai"
    if fs.exists(posixpath.join(root, "config.json")):
        config = _read_json(fs, posixpath.join(root, "config.json"))
        if config.get("model_type") == "gpt2" or "architectures" in config:
            return "hf"
        if config.get("model") == "GPT2":
            return "ours"
    raise UserError(
        f"{directory} holds no GPT-2 checkpoint this program knows: expected config.json + model.safetensors "
        "(Hugging Face), hparams.json + model.ckpt.* (OpenAI), or a model converted by `download`"
    )


def load_hf(directory: str) -> Pretrained:
    from safetensors.numpy import load as load_safetensors

    fs, root = fsspec.core.url_to_fs(directory)
    config = _read_json(fs, posixpath.join(root, "config.json"))
    if config.get("model_type", "gpt2") != "gpt2":
        raise UserError(f"{directory} is a {config.get('model_type')!r} model, not GPT-2")
    shape = {"n_vocab": config["vocab_size"], "n_ctx": config.get("n_positions", config.get("n_ctx")),
             "n_embd": config["n_embd"], "n_layer": config["n_layer"], "n_head": config["n_head"]}
    index = posixpath.join(root, "model.safetensors.index.json")
    if fs.exists(index):
        files = sorted(set(_read_json(fs, index)["weight_map"].values()))
        for name in files:  # the index names files beside it; a path could read any file as weights
            if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
                raise UserError(f"{index} names the shard {name!r}, which is not a plain file name in {directory}: "
                                "the index is damaged or crafted; use a model directory you trust")
    elif fs.exists(posixpath.join(root, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise UserError(f"{directory} has no model.safetensors (or model.safetensors.index.json): only "
                        "safetensors checkpoints are read (convert pytorch_model.bin with transformers first)")
    tensors = {}
    for name in files:
        with fs.open(posixpath.join(root, name), "rb") as f:
            for key, value in load_safetensors(f.read()).items():
                # Files saved from GPT2LMHeadModel prefix "transformer."; the hub's GPT2Model ones do not.
                tensors[key.removeprefix("transformer.")] = value
    return Pretrained(build_params(tensors.__getitem__, shape, directory, "hf"), shape, directory)


def load_openai(directory: str) -> Pretrained:
    from gpt2train.tf_checkpoint import TFCheckpoint

    fs, root = fsspec.core.url_to_fs(directory)
    hp = _read_json(fs, posixpath.join(root, "hparams.json"))
    shape = {k: int(hp[k]) for k in SHAPE_KEYS}
    ckpt = TFCheckpoint(posixpath.join(directory, "model.ckpt"))
    return Pretrained(build_params(ckpt.tensor, shape, directory, "openai"), shape, directory)


def load_ours(directory: str) -> Pretrained:
    from gpt2train.checkpoint import load_params
    from gpt2train.config import load_config

    cfg = load_config(posixpath.join(directory, "config.json"), {"model_path": directory})
    params, _ = load_params(cfg)
    params = {k: np.asarray(v) for k, v in _flatten(params).items()}
    tree: dict = {}
    for path, value in params.items():
        _set(tree, path, value)
    tree["wte"] = tree["wte"][: cfg.n_vocab]
    return Pretrained(tree, {k: getattr(cfg, k) for k in SHAPE_KEYS}, directory)


def _flatten(tree: dict, prefix: tuple = ()) -> dict[tuple, object]:
    out = {}
    for k, v in tree.items():
        out.update(_flatten(v, prefix + (k,)) if isinstance(v, dict) else {prefix + (k,): v})
    return out


def load_pretrained(source: str) -> Pretrained:
    """A model name (124M ...), a directory of any known format, or the id of a GPT-2 repository
    on the Hugging Face Hub (distilgpt2, org/name), downloaded."""
    from gpt2train.hub import MODELS, fetch_model, fetch_repo, is_repo_id

    if source in MODELS:
        source = fetch_model(source)
    elif "://" not in source and not os.path.exists(source) and is_repo_id(source):
        source = fetch_repo(source)
    kind = kind_of(source)
    return {"hf": load_hf, "openai": load_openai, "ours": load_ours}[kind](source)


def fit(pre: Pretrained, cfg) -> dict:
    """The pretrained parameters shaped for `cfg`: same widths, n_ctx at most the source's."""
    wrong = [k for k in SHAPE_KEYS if k != "n_ctx" and getattr(cfg, k) != pre.shape[k]]  # n_ctx may be shorter
    if wrong:
        raise UserError(
            f"the pretrained model {pre.source} has " + ", ".join(f"{k}={pre.shape[k]}" for k in wrong)
            + " but the config has " + ", ".join(f"{k}={getattr(cfg, k)}" for k in wrong)
            + ": set " + ", ".join(f'"{k}": {pre.shape[k]}' for k in wrong) + " in the config"
        )
    if cfg.n_ctx > pre.shape["n_ctx"]:
        raise UserError(f"n_ctx {cfg.n_ctx} is longer than the pretrained model's {pre.shape['n_ctx']} positions: "
                        f"set n_ctx to {pre.shape['n_ctx']} or less")
    params = {**pre.params, "wpe": pre.params["wpe"][: cfg.n_ctx]}  # fewer positions: keep the first
    wte = np.zeros((cfg.padded_vocab, cfg.n_embd), np.float32)
    wte[: cfg.n_vocab] = pre.params["wte"]
    params["wte"] = wte
    return params


def config_from_shape(shape: dict, **keys) -> dict:
    """A training config for a pretrained shape, with OpenAI's GPT-2 hyper-parameters (configs/124M.json)."""
    from gpt2train.config import Config

    base = {k: v for k, v in Config().to_dict().items()}
    base.update({"lr": 2.5e-4, "warmup_steps": 2000, "opt_name": "adam", "weight_decay": 0.01, "beta2": 0.98,
                 "epsilon": 1e-9, "train_batch_size": 64, "eval_batch_size": 32, "embed_dropout": 0.1,
                 "attn_dropout": 0.1, "res_dropout": 0.1})
    base.update(shape)
    base.update(keys)
    return base


# ---------------------------------------------------------------- export


def export_hf(params, cfg, out_dir: str, encoder_path: str | None = None) -> None:
    """Write an HF GPT-2 directory (config.json, model.safetensors, tokenizer files) from our parameters."""
    from safetensors.numpy import save as save_safetensors

    flat = {path: np.asarray(v, dtype=np.float32) for path, v in _flatten(params).items()}
    tensors = {}
    for ours, names in TOP_NAMES.items():
        value = flat[ours][: cfg.n_vocab] if ours == ("wte",) else flat[ours]
        tensors[f"transformer.{names[0]}"] = np.ascontiguousarray(value)
    for ours, names in BLOCK_NAMES.items():
        stacked = flat[("h", *ours)]
        for i in range(cfg.n_layer):
            tensors[f"transformer.h.{i}.{names[0]}"] = np.ascontiguousarray(stacked[i])
    config = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.n_vocab,
        "n_positions": cfg.n_ctx, "n_ctx": cfg.n_ctx, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer,
        "n_head": cfg.n_head, "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "resid_pdrop": cfg.res_dropout, "embd_pdrop": cfg.embed_dropout, "attn_pdrop": cfg.attn_dropout,
        "initializer_range": 0.02, "bos_token_id": cfg.n_vocab - 1, "eos_token_id": cfg.n_vocab - 1,
        "tie_word_embeddings": True, "scale_attn_weights": True,
    }
    fs, root = fsspec.core.url_to_fs(out_dir)
    fs.makedirs(root, exist_ok=True)
    with fs.open(posixpath.join(root, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with fs.open(posixpath.join(root, "model.safetensors"), "wb") as f:
        f.write(save_safetensors(tensors, metadata={"format": "pt"}))
    if encoder_path:
        from gpt2train.tokenizer import EOT, ENCODER_FILE, MERGES_FILE

        efs, eroot = fsspec.core.url_to_fs(encoder_path)
        for ours, theirs in ((ENCODER_FILE, "vocab.json"), (MERGES_FILE, "merges.txt")):
            with efs.open(posixpath.join(eroot, ours), "rb") as src, fs.open(posixpath.join(root, theirs), "wb") as dst:
                dst.write(src.read())
        tokenizer_config = {"model_max_length": cfg.n_ctx, "bos_token": EOT, "eos_token": EOT,
                            "unk_token": EOT, "tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False}
        with fs.open(posixpath.join(root, "tokenizer_config.json"), "w") as f:
            json.dump(tokenizer_config, f, indent=2)
