import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt2train import model as M
from gpt2train.config import Config
from gpt2train.evaluate import evaluate_text, windows
from conftest import STDLIB


def test_windows_score_every_token_once():
    stream = np.arange(23, dtype=np.int32)
    wins, mask = windows(stream, 5)
    assert wins.shape == (5, 6) and mask.sum() == 22
    targets = wins[:, 1:][mask]
    assert targets.tolist() == list(range(1, 23))
    for w in wins[:-1]:
        assert (np.diff(w) == 1).all()


def test_evaluate_matches_direct_computation(tmp_path, gpt2_tokenizer):
    cfg = Config(n_ctx=16, n_embd=32, n_layer=1, n_head=2, n_vocab=50257, eval_batch_size=3).validate()
    params = M.init_params(cfg, jax.random.PRNGKey(0))
    text = (STDLIB / "bisect.py").read_text()[:1500]
    (tmp_path / "a.txt").write_text(text)
    result = evaluate_text(cfg, params, gpt2_tokenizer, str(tmp_path / "a.txt"))
    ids = gpt2_tokenizer.encode(text) + [gpt2_tokenizer.eot_id]
    # Direct: score each window of 16 targets with the full model, no batching or padding.
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, 16):
        chunk = ids[start:start + 17]
        logits = M.forward(params, jnp.asarray([chunk[:-1]]), cfg)[0]
        logp = jax.nn.log_softmax(logits, -1)
        total -= float(sum(logp[i, t] for i, t in enumerate(chunk[1:])))
        count += len(chunk) - 1
    assert result["tokens"] == count == len(ids) - 1
    assert result["loss"] == pytest.approx(total / count, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    n_bytes = len(text.encode()) - len(gpt2_tokenizer.decode_bytes(ids[:1]))  # the first token is never a target
    assert result["bytes"] == n_bytes
    assert result["bits_per_byte"] == pytest.approx(total / math.log(2) / n_bytes, rel=1e-5)
