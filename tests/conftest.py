"""Shared fixtures: GPT-2's real encoder files, small real text, tiny configs."""

import importlib
import json
import os
import shutil
import sysconfig
import tempfile
from pathlib import Path

import pytest

from gpt2train.config import Config
from gpt2train.tokenizer import GPT2_ENCODER_DIR

REPO = Path(__file__).resolve().parents[1]
# The commands' compilation cache (gpt2train/compile_cache.py): one per test session, shared by
# every command a test runs, never the user's own.
_OWN_CACHE = None if "GPT2TRAIN_COMPILE_CACHE" in os.environ else tempfile.mkdtemp(prefix="gpt2train-test-xla-")
if _OWN_CACHE:
    os.environ["GPT2TRAIN_COMPILE_CACHE"] = _OWN_CACHE


# Inference precision `auto` follows the CPU (bfloat16 where it is native): pin it to "not native"
# so every machine runs the same precision; tests of bfloat16 inference ask for it themselves.
os.environ["GPT2TRAIN_NATIVE_BF16"] = "0"


def pytest_sessionfinish(session, exitstatus):
    if _OWN_CACHE:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


def import_test_extra(name: str):
    """A module of the `test` extra (torch, transformers): skipped when it is not installed, except
    under CI=true, where a missing reference is an error: a parity test that skips proves nothing."""
    if os.environ.get("CI") == "true":
        try:
            return importlib.import_module(name)
        except ImportError as e:
            raise ImportError(f"{name} is not installed but CI=true: install the test extra "
                              f"(pip install -e \".[test]\"); it is the reference the parity tests need") from e
    return pytest.importorskip(name)


# Weights for HF parity tests on which every component of GPT-2 shows in the logits. HF's own
# init (std 0.02) keeps activations so small that an exact-erf GELU (wrong for GPT-2) changes
# the logits by 2e-5 of their scale, inside any float32 tolerance; at these scales it changes
# them by ~2e-4 of it. Embeddings stay small so that LayerNorm's epsilon still matters (1e-6
# instead of 1e-5 moves the logits by ~2.4e-3 of their scale), as it does in GPT-2's first layer.
PARITY_STD = 0.3        # matmul kernels and biases; LayerNorm gains are 1 + N(0, PARITY_STD)
PARITY_EMBED_STD = 0.05  # token and position embeddings
# Our float32 logits agree with PyTorch's to ~1.3e-6 of the largest logit (summation orders
# differ); a tolerance of 2e-5 of it keeps ~10x from both that and the smallest error it must
# catch (tests/test_parity_hf.py's negative controls).
LOGIT_TOLERANCE = 2e-5


def make_every_component_matter(hf, seed: int = 0):
    """Redraw an HF GPT-2's weights in place at the PARITY_* scales (the head stays tied to wte)."""
    import torch
    generator = torch.Generator().manual_seed(seed)

    def normal(p, std):
        return torch.randn(p.shape, generator=generator) * std

    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(("wte.weight", "wpe.weight")):
                p.copy_(normal(p, PARITY_EMBED_STD))
            elif ".ln_" in name and name.endswith("weight"):
                p.copy_(1 + normal(p, PARITY_STD))
            else:
                p.copy_(normal(p, PARITY_STD))
    return hf


def logit_gap(ours, want) -> float:
    """The largest difference between two sets of logits, as a fraction of the largest logit."""
    import numpy as np
    ours, want = np.asarray(ours, np.float64), np.asarray(want, np.float64)
    return float(np.abs(ours - want).max() / np.abs(want).max())


ENCODER_DIR = Path(GPT2_ENCODER_DIR)  # the package's own copy of GPT-2's vocabulary
STDLIB = Path(sysconfig.get_paths()["stdlib"])


def tiny_config(tmp_path, **overrides) -> Config:
    """A 2-layer, 64-wide GPT-2 on GPT-2's vocabulary that trains in seconds on CPU."""
    values = dict(n_ctx=32, n_embd=64, n_layer=2, n_head=4, n_vocab=50257,
                  encoder_path=str(ENCODER_DIR), model_path=str(tmp_path / "model"),
                  data_path=str(STDLIB / "json" / "*.py"), eval_data_path=str(STDLIB / "email" / "mime" / "*.py"),
                  train_batch_size=4, eval_batch_size=4, max_steps=6, train_steps=3, eval_steps=2,
                  iterations=2, warmup_steps=2, lr=1e-3, embed_dropout=0.0, attn_dropout=0.0,
                  res_dropout=0.0, predict_path=str(tmp_path / "predictions.txt"))
    values.update(overrides)
    return Config(**values).validate()


def write_config(path: Path, cfg: Config) -> Path:
    path.write_text(json.dumps(cfg.to_dict(), indent=1))
    return path


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    from gpt2train.tokenizer import load_tokenizer
    return load_tokenizer(str(ENCODER_DIR))
