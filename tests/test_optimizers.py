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


def test_every_registered_optimizer_reads_real_keys_and_builds():
    from gpt2train.config import FIELDS
    from gpt2train.optimizers import OPTIMIZERS, make_optimizer
    cfg = Config(n_ctx=8, n_embd=16, n_layer=2, n_head=2, n_vocab=50)
    params = init_params(cfg, jax.random.PRNGKey(0))
    assert set(OPTIMIZERS) >= {"adam", "adamw", "adafactor"}
    for name, opt in OPTIMIZERS.items():
        assert opt.doc and all(key in FIELDS for key in opt.keys), name
        tx = make_optimizer(cfg.replace(opt_name=name))
        updates, _ = tx.update(jax.tree.map(lambda p: p * 0 + 1, params), tx.init(params), params)
        assert jax.tree.structure(updates) == jax.tree.structure(params)


def test_a_registered_optimizer_is_one_function():
    """Registering a builder is all it takes: the config accepts its name and training uses it."""
    import optax
    from gpt2train import optimizers
    from gpt2train.errors import UserError
    with pytest.raises(UserError, match="opt_name"):
        Config(opt_name="sgd").validate()
    optimizers.register_optimizer("sgd", ("beta1",), "plain SGD with momentum beta1")(
        lambda cfg, schedule: optax.sgd(schedule, momentum=cfg.beta1 or None))
    try:
        cfg = Config(n_ctx=8, n_embd=16, n_layer=2, n_head=2, n_vocab=50, opt_name="sgd", grad_clip=0.0,
                     warmup_steps=0, lr=0.1, min_lr_ratio=1.0, beta1=0.0).validate()
        params = {"w": jax.numpy.ones(3)}
        tx = optimizers.make_optimizer(cfg)
        updates, _ = tx.update({"w": jax.numpy.ones(3)}, tx.init(params), params)
        assert float(updates["w"][0]) == pytest.approx(-0.1)
    finally:
        optimizers.OPTIMIZERS.pop("sgd")
