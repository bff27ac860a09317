"""Our GPT-2 computes what HF transformers' GPT-2 computes (PyTorch CPU, random weights)."""

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import import_test_extra

torch = import_test_extra("torch")
transformers = import_test_extra("transformers")

from gpt2train import model as M  # noqa: E402
from gpt2train.config import Config  # noqa: E402


def hf_to_params(hf, cfg: Config) -> dict:
    """Map an HF GPT2LMHeadModel's tensors onto our stacked pytree (test-only converter)."""
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    L = cfg.n_layer

    def stack(name):
        return jnp.asarray(np.stack([sd[f"transformer.h.{i}.{name}"] for i in range(L)]))

    wte = np.zeros((cfg.padded_vocab, cfg.n_embd), np.float32)
    wte[:cfg.n_vocab] = sd["transformer.wte.weight"]
    return {
        "wte": jnp.asarray(wte), "wpe": jnp.asarray(sd["transformer.wpe.weight"]),
        "h": {
            "ln_1": {"scale": stack("ln_1.weight"), "bias": stack("ln_1.bias")},
            "attn": {"c_attn": {"kernel": stack("attn.c_attn.weight"), "bias": stack("attn.c_attn.bias")},
                     "c_proj": {"kernel": stack("attn.c_proj.weight"), "bias": stack("attn.c_proj.bias")}},
            "ln_2": {"scale": stack("ln_2.weight"), "bias": stack("ln_2.bias")},
            "mlp": {"c_fc": {"kernel": stack("mlp.c_fc.weight"), "bias": stack("mlp.c_fc.bias")},
                    "c_proj": {"kernel": stack("mlp.c_proj.weight"), "bias": stack("mlp.c_proj.bias")}},
        },
        "ln_f": {"scale": jnp.asarray(sd["transformer.ln_f.weight"]), "bias": jnp.asarray(sd["transformer.ln_f.bias"])},
    }


@pytest.mark.parametrize("n_layer, n_embd, n_head, n_vocab, n_ctx", [
    (2, 64, 4, 300, 32),
    (3, 48, 3, 257, 24),   # odd sizes: head dim 16, vocabulary not a multiple of anything
])
def test_logits_and_loss_match_hf(n_layer, n_embd, n_head, n_vocab, n_ctx):
    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=n_vocab,
                                     n_positions=n_ctx, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0,
                                     bos_token_id=n_vocab - 1, eos_token_id=n_vocab - 1)
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    with torch.no_grad():  # HF zero-inits nothing interesting; perturb biases/LayerNorms so they matter
        for name, p in hf.named_parameters():
            if "ln" in name or "bias" in name:
                p.add_(0.1 * torch.randn_like(p))
    cfg = Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_vocab=n_vocab, n_ctx=n_ctx).validate()
    params = hf_to_params(hf, cfg)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, n_vocab, size=(3, n_ctx + 1))
    with torch.no_grad():
        out = hf(torch.tensor(tokens[:, :-1]), labels=torch.tensor(tokens[:, :-1]))
        hf_logits = out.logits.numpy()
    ours = np.asarray(M.forward(params, jnp.asarray(tokens[:, :-1]), cfg))[..., :n_vocab]
    np.testing.assert_allclose(ours, hf_logits, atol=1e-4, rtol=1e-4)
    # HF's labels shift inside the model: the same next-token loss as ours on the same window.
    our_loss = float(M.token_losses(params, jnp.asarray(tokens[:, :-1]), cfg).mean())
    assert our_loss == pytest.approx(float(out.loss), abs=1e-4)
