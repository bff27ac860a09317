"""Our GPT-2 computes what HF transformers' GPT-2 computes (PyTorch CPU), on random weights large
enough that every component shows in the logits, and four plausible mistakes each fail it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import import_test_extra

torch = import_test_extra("torch")
transformers = import_test_extra("transformers")

from conftest import LOGIT_TOLERANCE, logit_gap, make_every_component_matter  # noqa: E402
from gpt2train import kernels as K  # noqa: E402
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


SHAPES = [  # n_layer, n_embd, n_head, n_vocab, n_ctx
    (2, 64, 4, 300, 32),
    (3, 48, 3, 257, 24),   # odd sizes: head dim 16, vocabulary not a multiple of anything
]


def hf_and_ours(n_layer, n_embd, n_head, n_vocab, n_ctx, **cfg_keys):
    hf_cfg = transformers.GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=n_vocab,
                                     n_positions=n_ctx, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0,
                                     bos_token_id=n_vocab - 1, eos_token_id=n_vocab - 1)
    hf = make_every_component_matter(transformers.GPT2LMHeadModel(hf_cfg).eval())
    cfg = Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_vocab=n_vocab, n_ctx=n_ctx, **cfg_keys).validate()
    return hf, cfg, hf_to_params(hf, cfg)


def compare(hf, cfg, params):
    """(gap of our logits from HF's as a fraction of the largest, our loss, HF's loss) on 3 windows."""
    tokens = np.random.default_rng(0).integers(0, cfg.n_vocab, size=(3, cfg.n_ctx + 1))
    with torch.no_grad():
        out = hf(torch.tensor(tokens[:, :-1]), labels=torch.tensor(tokens[:, :-1]))
    # HF's labels shift inside the model: the same next-token loss as ours on the same window.
    # Traced afresh at every call, so a monkeypatched piece of the model is what runs.
    ours, our_loss = jax.jit(lambda p, t: (M.forward(p, t, cfg), M.token_losses(p, t, cfg).mean()))(
        params, jnp.asarray(tokens[:, :-1]))
    return logit_gap(np.asarray(ours)[..., :cfg.n_vocab], out.logits.numpy()), float(our_loss), float(out.loss)


@pytest.mark.parametrize("kernels", ["cpu", "standard"])
@pytest.mark.parametrize("shape", SHAPES)
def test_logits_and_loss_match_hf(shape, kernels):
    gap, our_loss, hf_loss = compare(*hf_and_ours(*shape, kernels=kernels))
    assert gap < LOGIT_TOLERANCE
    assert our_loss == pytest.approx(hf_loss, abs=1e-4)


# ---------------------------------------------------------------------- negative controls
# Each replaces one piece of our GPT-2 with a plausible mistake; the comparison above must then
# fail, or the parity tests could not tell that mistake from GPT-2.

def exact_erf_gelu_mlp(x, p, dtype, impl):
    h = jax.nn.gelu(M.dense(x, p["c_fc"], dtype, impl), approximate=False)  # GPT-2 uses the tanh form
    return M.dense(h, p["c_proj"], dtype, impl)


def unscaled_block_probs(qh, kh, start, end):
    s = jnp.einsum("bhqd,bhkd->bhqk", qh[:, :, start:end], kh[:, :, :end], preferred_element_type=jnp.float32)
    visible = jnp.arange(end)[None, :] <= jnp.arange(start, end)[:, None]
    return jax.nn.softmax(jnp.where(visible, s, -jnp.inf), axis=-1)  # no division by sqrt(head_dim)


def untied_head(original):
    """An output head of its own (drawn like wte) instead of wte itself."""
    def logits_from_hidden(params, x, cfg):
        wte = params["wte"]
        own = jax.random.normal(jax.random.PRNGKey(1), wte.shape) * jnp.std(wte[:cfg.n_vocab])
        return original({**params, "wte": own}, x, cfg)
    return logits_from_hidden


MUTATIONS = {
    "exact-erf GELU": lambda mp: mp.setattr(M, "mlp", exact_erf_gelu_mlp),
    "no attention scale": lambda mp: mp.setattr(K, "_block_probs", unscaled_block_probs),
    "LayerNorm epsilon 1e-6": lambda mp: mp.setattr(M, "LN_EPS", 1e-6),
    "untied output head": lambda mp: mp.setattr(M, "logits_from_hidden", untied_head(M.logits_from_hidden)),
}


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_parity_fails_for_a_mutated_model(mutation, monkeypatch):
    hf, cfg, params = hf_and_ours(*SHAPES[0], kernels="cpu")
    MUTATIONS[mutation](monkeypatch)
    gap, _, _ = compare(hf, cfg, params)
    assert gap > 3 * LOGIT_TOLERANCE, f"{mutation}: logits within {gap:.1e} of HF's, the parity test would pass"
