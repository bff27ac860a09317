"""Inference precision: bfloat16 weights for generate, evaluate and serve, and what they cost in quality
on a trained model (held-out perplexity, greedy text) against float32."""

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import STDLIB, tiny_config, write_config
from gpt2train.evaluate import evaluate_stream, token_stream
from gpt2train.generate import Generator
from gpt2train.inference import hold_params, inference_config, native_bf16
from gpt2train.sampling import SamplingOptions
from gpt2train.train import Trainer


@pytest.fixture(scope="module")
def trained(tmp_path_factory, gpt2_tokenizer):
    """A 2-layer model trained until its predictions are peaked (held-out perplexity far below the
    vocabulary's 50257): the regime in which rounding could change what a user sees."""
    tmp = tmp_path_factory.mktemp("inference")
    cfg = tiny_config(tmp, n_ctx=64, data_path=str(STDLIB / "json" / "*.py"), eval_steps=0, max_steps=120,
                      train_steps=120, iterations=40, warmup_steps=10, lr=3e-3, weight_decay=0.0, min_lr_ratio=1.0)
    trainer = Trainer(cfg, gpt2_tokenizer, progress=False, log=lambda *a, **k: None)
    trainer.run()
    return cfg, trainer.state["params"]


def test_auto_is_bfloat16_only_where_the_hardware_has_it(monkeypatch):
    cfg = tiny_config(pathlib.Path("/tmp"))
    monkeypatch.setenv("GPT2TRAIN_NATIVE_BF16", "0")
    assert not native_bf16() and inference_config(cfg).precision == "float32"
    assert inference_config(cfg.replace(precision="bfloat16")).precision == "bfloat16"  # the run's own choice
    monkeypatch.setenv("GPT2TRAIN_NATIVE_BF16", "1")
    assert native_bf16() and inference_config(cfg).precision == "bfloat16"
    assert inference_config(cfg.replace(inference_precision="float32")).precision == "float32"  # asked for it


def test_held_weights_are_bfloat16_matrices_and_float32_vectors(trained):
    cfg, params = trained
    held = hold_params(params, cfg.replace(precision="bfloat16"))
    assert held["wte"].dtype == held["wpe"].dtype == held["h"]["mlp"]["c_fc"]["kernel"].dtype == jnp.bfloat16
    assert held["h"]["ln_1"]["scale"].dtype == held["h"]["attn"]["c_attn"]["bias"].dtype == jnp.float32
    size = lambda tree: sum(a.nbytes for a in __import__("jax").tree.leaves(tree))  # noqa: E731
    assert size(held) < 0.52 * size(params)  # half the bytes per token to stream
    assert hold_params(params, cfg) is params  # float32: nothing changes


def test_bfloat16_costs_under_half_a_percent_of_perplexity(trained, gpt2_tokenizer):
    cfg, params = trained
    held_out, _ = token_stream(str(STDLIB / "email" / "mime" / "*.py"), gpt2_tokenizer)
    f32 = evaluate_stream(cfg, params, gpt2_tokenizer, held_out)
    bf16_cfg = cfg.replace(precision="bfloat16")
    bf16 = evaluate_stream(bf16_cfg, hold_params(params, bf16_cfg), gpt2_tokenizer, held_out)
    assert f32["perplexity"] < 2000  # trained: far from the untrained ~50000
    assert abs(bf16["perplexity"] / f32["perplexity"] - 1) < 0.005, (f32["perplexity"], bf16["perplexity"])


@pytest.mark.parametrize("together", [True, False])
def test_bfloat16_greedy_text_matches_float32(trained, gpt2_tokenizer, together):
    """Together: a batch of 3 (XLA's bfloat16 products); alone: one text at a time, whose products
    go to the native kernel on CPUs with AVX-512 bfloat16 (kernels.native_rows)."""
    cfg, params = trained
    opts = SamplingOptions(length=50, temperature=0.0, stop_at_eot=False)
    prompts = ["import json\n", "def decode(self, s):", "class JSONEncoder(object):"]
    f32 = Generator(cfg, params, gpt2_tokenizer, chunk=16).generate(prompts, opts, return_tokens=True)
    bf16_cfg = cfg.replace(precision="bfloat16")
    bf16_gen = Generator(bf16_cfg, hold_params(params, bf16_cfg), gpt2_tokenizer, chunk=16)
    if together:
        bf16 = bf16_gen.generate(prompts, opts, return_tokens=True)
    else:
        bf16 = [bf16_gen.generate([p], opts, return_tokens=True)[0] for p in prompts]
    first_divergence = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in zip(f32, bf16)]
    assert first_divergence == [50, 50, 50], f"bfloat16 greedy text first differs at tokens {first_divergence}"


def test_evaluate_and_generate_commands_run_in_the_precision_asked(tmp_path, trained):
    from test_cli import run
    cfg, params = trained
    from gpt2train.checkpoint import Checkpointer
    ckpt = Checkpointer(cfg.replace(model_path=str(tmp_path / "model")))
    ckpt.save(120, {"params": params}, {}, kind="pretrained")
    ckpt.close()
    path = write_config(tmp_path / "c.json", cfg.replace(model_path=str(tmp_path / "model")))
    out = {}
    for precision in ("float32", "bfloat16"):
        got = run("-m", "gpt2train", "evaluate", "--model", str(path), "--data", str(STDLIB / "json" / "tool.py"),
                  "--json", "--inference_precision", precision)
        assert got.returncode == 0, got.stderr
        out[precision] = json.loads(got.stdout.strip().splitlines()[-1])
        assert out[precision]["precision"] == precision
    assert np.isclose(out["bfloat16"]["perplexity"], out["float32"]["perplexity"], rtol=0.005)
    sampled = run("-m", "gpt2train", "generate", "--model", str(path), "--predict_text", "import json",
                  "--length", "8", "--inference_precision", "bfloat16")
    assert sampled.returncode == 0 and "SAMPLE 0" in sampled.stdout, sampled.stderr
