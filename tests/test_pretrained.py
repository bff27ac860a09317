"""Pretrained GPT-2: HF and OpenAI imports, export, sliding-window perplexity, all against
HF transformers (PyTorch CPU) on random models saved to disk."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import (ENCODER_DIR, LOGIT_TOLERANCE, PARITY_STD, import_test_extra, logit_gap,
                      make_every_component_matter)

torch = import_test_extra("torch")
transformers = import_test_extra("transformers")

from gpt2train import model as M  # noqa: E402
from gpt2train.config import Config  # noqa: E402
from gpt2train.errors import UserError  # noqa: E402
from gpt2train.evaluate import evaluate_stream  # noqa: E402
from gpt2train.pretrained import export_hf, fit, load_hf, load_openai, load_pretrained  # noqa: E402

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


def random_hf(n_layer, n_embd, n_head, n_vocab, n_ctx, seed=0):
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=n_vocab, n_positions=n_ctx,
        resid_pdrop=0, embd_pdrop=0, attn_pdrop=0, bos_token_id=n_vocab - 1, eos_token_id=n_vocab - 1)).eval()
    return make_every_component_matter(hf, seed)  # weights on which a wrong GELU, scale or epsilon shows


def config_for(shape, **kw):
    return Config(**{k: shape[k] for k in ("n_vocab", "n_ctx", "n_embd", "n_layer", "n_head")}, **kw).validate()


def hf_logits(hf, tokens):
    with torch.no_grad():
        out = hf(torch.tensor(tokens), labels=torch.tensor(tokens))
    return out.logits.numpy(), float(out.loss)


@pytest.mark.parametrize("shape, shard", [
    ((2, 64, 4, 300, 32), None),
    ((3, 48, 3, 257, 37), "20KB"),   # odd sizes, and a sharded safetensors checkpoint
])
def test_hf_import_gives_hf_logits_and_export_round_trips(tmp_path, shape, shard):
    hf = random_hf(*shape)
    kw = {"max_shard_size": shard} if shard else {}
    hf.save_pretrained(tmp_path / "hf", **kw)
    if shard:
        assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    pre = load_pretrained(str(tmp_path / "hf"))
    cfg = config_for(pre.shape)
    params = fit(pre, cfg)
    tokens = np.random.default_rng(1).integers(0, cfg.n_vocab, (2, cfg.n_ctx))
    want, want_loss = hf_logits(hf, tokens)
    ours = np.asarray(M.forward(params, jnp.asarray(tokens), cfg))[..., :cfg.n_vocab]
    assert logit_gap(ours, want) < LOGIT_TOLERANCE
    assert float(M.token_losses(params, jnp.asarray(tokens), cfg).mean()) == pytest.approx(want_loss, abs=1e-5)
    # export -> from_pretrained -> the same logits again, with no missing or unexpected tensors
    export_hf(params, cfg, str(tmp_path / "export"), str(ENCODER_DIR))
    back, info = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "export", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    np.testing.assert_allclose(hf_logits(back.eval(), tokens)[0], want, atol=1e-5, rtol=0)


def test_greedy_generation_matches_hf_for_50_tokens(tmp_path, gpt2_tokenizer):
    from gpt2train.generate import Generator
    from gpt2train.sampling import SamplingOptions
    hf = random_hf(2, 32, 2, 50257, 64, seed=3)
    hf.save_pretrained(tmp_path / "hf")
    pre = load_hf(str(tmp_path / "hf"))
    cfg = config_for(pre.shape)
    prompt = "The history of the bridge"
    ids = gpt2_tokenizer.encode(prompt)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    with torch.no_grad():
        want = hf.generate(torch.tensor([ids]), max_new_tokens=50, do_sample=False)[0, len(ids):].tolist()
    got = Generator(cfg, fit(pre, cfg), gpt2_tokenizer).generate(
        [prompt], SamplingOptions(length=50, temperature=0.0, stop_at_eot=False), return_tokens=True)[0]
    assert got == want


def test_openai_checkpoint_imports_without_tensorflow():
    directory = FIXTURES / "openai_tiny"
    pre = load_openai(str(directory))
    expected = np.load(directory / "expected.npz")
    hp = json.loads((directory / "hparams.json").read_text())
    assert pre.shape == {k: hp[k] for k in ("n_vocab", "n_ctx", "n_embd", "n_layer", "n_head")}
    # The same weights through HF's model (written by hand from the TF-side values) give the same logits.
    # The fixture's matmul weights have GPT-2's init std, 0.02, under which a wrong GELU would not show:
    # both sides take them 15x larger (std 0.3), still the same weights.
    boost = PARITY_STD / 0.02
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=hp["n_layer"], n_embd=hp["n_embd"], n_head=hp["n_head"], vocab_size=hp["n_vocab"],
        n_positions=hp["n_ctx"], resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)).eval()
    state = {}
    for key in expected.files:
        name = key.removeprefix("model.")
        value = torch.tensor(expected[key])
        if name.startswith("h"):
            layer, rest = name.split(".", 1)
            *module, leaf = rest.split(".")
            rest = ".".join([*module, {"g": "weight", "b": "bias", "w": "weight"}[leaf]])
            name = f"h.{layer[1:]}.{rest}"
            value = value[0] * boost if value.ndim == 3 else value
        else:
            name = {"wte": "wte.weight", "wpe": "wpe.weight", "ln_f.g": "ln_f.weight", "ln_f.b": "ln_f.bias"}[name]
        state["transformer." + name] = value
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all(k in ("lm_head.weight",) or ".attn.bias" in k for k in missing)
    hf.tie_weights()
    cfg = config_for(pre.shape)
    tokens = np.random.default_rng(2).integers(0, cfg.n_vocab, (2, cfg.n_ctx))
    params = jax.tree_util.tree_map_with_path(lambda path, a: a * boost if path[-1].key == "kernel" else a,
                                              fit(pre, cfg))
    ours = np.asarray(M.forward(params, jnp.asarray(tokens), cfg))[..., :cfg.n_vocab]
    assert logit_gap(ours, hf_logits(hf, tokens)[0]) < LOGIT_TOLERANCE


def test_sliding_window_perplexity_equals_hfs(tmp_path, gpt2_tokenizer):
    hf = random_hf(2, 32, 2, 50257, 32, seed=5)
    hf.save_pretrained(tmp_path / "hf")
    pre = load_hf(str(tmp_path / "hf"))
    cfg = config_for(pre.shape, eval_batch_size=4)
    text = (pathlib.Path(json.__file__).parent / "scanner.py").read_text()[:1500]
    ids = gpt2_tokenizer.encode(text)
    stream = np.array(ids, np.int32)
    max_length, stride = 32, 12
    # HF's documented loop, summing the exact token losses of each window's new targets.
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        trg_len = end - prev_end
        input_ids = torch.tensor([ids[begin:end]])
        target = input_ids.clone()
        target[:, :-trg_len] = -100
        with torch.no_grad():
            logits = hf(input_ids).logits[0, :-1]
        labels = target[0, 1:]
        losses = torch.nn.functional.cross_entropy(logits, labels.clamp(min=0), reduction="none")
        nll += float(losses[labels != -100].sum())
        count += int((labels != -100).sum())
        prev_end = end
        if end == len(ids):
            break
    result = evaluate_stream(cfg, fit(pre, cfg), gpt2_tokenizer, stream, stride=stride)
    assert result["tokens"] == count == len(ids) - 1
    assert result["perplexity"] == pytest.approx(np.exp(nll / count), rel=1e-5)


def test_shape_mismatches_are_named(tmp_path):
    hf = random_hf(2, 64, 4, 300, 32)
    hf.save_pretrained(tmp_path / "hf")
    pre = load_pretrained(str(tmp_path / "hf"))
    with pytest.raises(UserError, match='n_embd=64 but the config has n_embd=32: set "n_embd": 64'):
        fit(pre, config_for({**pre.shape, "n_embd": 32}))
    with pytest.raises(UserError, match="n_ctx 64 is longer"):
        fit(pre, config_for({**pre.shape, "n_ctx": 64}))
    short = fit(pre, config_for({**pre.shape, "n_ctx": 16}))
    assert short["wpe"].shape == (16, 64)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg, "n_embd": 48}))
    with pytest.raises(UserError, match=r"tensor 'wte.weight' has shape \(300, 64\) .* needs \(300, 48\)"):
        load_pretrained(str(tmp_path / "hf"))
    with pytest.raises(UserError, match="holds no GPT-2 checkpoint"):
        load_pretrained(str(tmp_path))


def test_download_converts_a_local_directory_into_a_ready_config(tmp_path):
    from gpt2train.cli import run_main
    from gpt2train.config import load_config
    from gpt2train.checkpoint import load_params
    hf = random_hf(2, 32, 2, 50257, 48, seed=7)
    hf.save_pretrained(tmp_path / "my-gpt2")
    for ours, theirs in (("encoder.json", "vocab.json"), ("vocab.bpe", "merges.txt")):
        (tmp_path / "my-gpt2" / theirs).write_bytes((ENCODER_DIR / ours).read_bytes())
    assert run_main(["download", str(tmp_path / "my-gpt2"), "--out", str(tmp_path / "models")]) == 0
    cfg = load_config(str(tmp_path / "models" / "my-gpt2" / "config.json"))
    assert (cfg.n_embd, cfg.n_ctx, cfg.encoder_path) == (32, 48, str(tmp_path / "models" / "my-gpt2" / "encoder"))
    params, step = load_params(cfg)
    tokens = np.random.default_rng(3).integers(0, 50257, (1, 48))
    ours = np.asarray(M.forward(params, jnp.asarray(tokens), cfg))[..., :50257]
    assert logit_gap(ours, hf_logits(hf, tokens)[0]) < LOGIT_TOLERANCE
    with pytest.raises(UserError, match="already holds a model"):
        from gpt2train.download import download
        download(str(tmp_path / "my-gpt2"), str(tmp_path / "models"), log=lambda *_: None)


def test_export_without_encoder_path_ships_gpt2s_vocabulary(tmp_path):
    """A config that leaves encoder_path out trains with GPT-2's BPE, so its export carries it too."""
    from conftest import tiny_config, write_config
    from gpt2train.cli import run_main
    from gpt2train.tokenizer import load_tokenizer
    from gpt2train.train import Trainer
    cfg = tiny_config(tmp_path, encoder_path="")
    trainer = Trainer(cfg, load_tokenizer(cfg.encoder_path), progress=False, log=lambda *a: None)
    trainer.save()  # step 0
    trainer.ckpt.close()
    assert run_main(["export", "--model", str(write_config(tmp_path / "config.json", cfg)),
                     "--out", str(tmp_path / "hf")]) == 0
    for ours, theirs in (("encoder.json", "vocab.json"), ("vocab.bpe", "merges.txt")):
        assert (tmp_path / "hf" / theirs).read_bytes() == (ENCODER_DIR / ours).read_bytes()
