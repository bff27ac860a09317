import jax
import pytest

from gpt2train.config import Config
from gpt2train.model import init_params
from gpt2train.optimizers import decay_mask, learning_rate_schedule


def test_schedule_warms_up_then_cosine_to_floor():
    cfg = Config(lr=1e-3, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    f = learning_rate_schedule(cfg)
    assert float(f(0)) == 0.0
    assert float(f(5)) == pytest.approx(5e-4)
    assert float(f(10)) == pytest.approx(1e-3)
    assert float(f(60)) == pytest.approx(0.55e-3, rel=1e-3)  # halfway through the cosine
    assert float(f(110)) == pytest.approx(1e-4)


def test_weight_decay_mask_covers_matrices_only():
    cfg = Config(n_ctx=8, n_embd=16, n_layer=2, n_head=2, n_vocab=50)
    mask = decay_mask(init_params(cfg, jax.random.PRNGKey(0)))
    assert mask["wte"] and mask["wpe"]
    assert mask["h"]["attn"]["c_attn"]["kernel"] and mask["h"]["mlp"]["c_proj"]["kernel"]
    assert not mask["h"]["attn"]["c_attn"]["bias"] and not mask["h"]["ln_1"]["scale"]
    assert not mask["ln_f"]["bias"]
