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
