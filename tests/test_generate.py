import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt2train import model as M
from gpt2train.config import Config
from gpt2train.errors import UserError
from gpt2train.generate import PROMPT_BUCKET, Generator, format_sample
from gpt2train.sampling import SamplingOptions, filter_logits


@pytest.fixture(scope="module")
def gen(gpt2_tokenizer):
    cfg = Config(n_ctx=64, n_embd=64, n_layer=2, n_head=4, n_vocab=50257).validate()
    return Generator(cfg, stacked_params(cfg), gpt2_tokenizer, chunk=8)


def stacked_params(cfg):
    return M.init_params(cfg, jax.random.PRNGKey(0))


def test_same_seed_same_text_other_seed_other_text(gen):
    opts = SamplingOptions(length=20, temperature=1.0, seed=7, stop_at_eot=False)
    a = gen.generate(["Hello there", "def f(x):"], opts, return_tokens=True)
    b = gen.generate(["Hello there", "def f(x):"], opts, return_tokens=True)
    c = gen.generate(["Hello there", "def f(x):"], SamplingOptions(length=20, seed=8, stop_at_eot=False),
                     return_tokens=True)
    assert a == b and a != c
    assert all(len(x) == 20 for x in a)


def test_greedy_matches_step_by_step_full_forward(gen):
    """The cached, chunked, compiled decode loop gives what recomputing the whole prefix gives."""
    prompt = "The meaning of life is"
    compiled = gen._decode._cache_size()
    got = gen.generate([prompt], SamplingOptions(length=12, temperature=0.0, stop_at_eot=False),
                       return_tokens=True)[0]
    ids = gen.tok.encode(prompt)
    want = []
    for _ in range(12):
        logits = M.forward(stacked_params(gen.cfg), jnp.asarray([ids + want]), gen.cfg)[0, -1]
        want.append(int(jnp.argmax(logits)))
    assert got == want
    # 12 tokens in calls of 8: the shorter last call ran the same compiled program (a traced count).
    assert gen._decode._cache_size() - compiled <= 1


def test_seed_temperature_top_p_penalty_and_length_recompile_nothing(gen):
    """A server or a prompt file changes these per request (sample_prompts changes the seed per
    batch): they are data to the compiled programs, and lengths within one chunk of 8 share a
    cache size."""
    base = dict(top_p=0.9, repetition_penalty=1.2, stop_at_eot=False)
    first = gen.generate(["Hello"], SamplingOptions(length=12, temperature=1.0, seed=1, **base), return_tokens=True)
    decode, prefill = gen._decode._cache_size(), gen._prefill._cache_size()
    texts = [first[0]]
    for length, temperature, seed, top_p, penalty in [(12, 1.0, 2, 0.9, 1.2), (10, 0.7, 1, 0.9, 1.2),
                                                      (16, 1.0, 1, 0.5, 1.2), (9, 1.0, 1, 0.9, 1.5)]:
        opts = SamplingOptions(length=length, temperature=temperature, seed=seed, top_p=top_p,
                               repetition_penalty=penalty, stop_at_eot=False)
        texts.append(gen.generate(["Hello"], opts, return_tokens=True)[0])
        assert len(texts[-1]) == length
    assert (gen._decode._cache_size(), gen._prefill._cache_size()) == (decode, prefill)
    # The seed, temperature and top-p did change the text (a random model's near-uniform
    # predictions rarely pick a penalised token, so the penalty is shown by test_filters).
    assert len({tuple(t[:9]) for t in texts[:4]}) == 4


def test_batched_prompts_of_different_lengths_match_alone(gen):
    prompts = ["a", "a much longer prompt with many more tokens in it than the first"]
    opts = SamplingOptions(length=10, temperature=0.0, stop_at_eot=False)
    together = gen.generate(prompts, opts, return_tokens=True)
    alone = [gen.generate([p], opts, return_tokens=True)[0] for p in prompts]
    assert together == alone
    # Batch 1 reads transposed kernels; going back to a batch converts them back exactly.
    assert gen.generate(prompts, opts, return_tokens=True) == together


def test_top_k_one_is_greedy(gen):
    g = gen.generate(["x = "], SamplingOptions(length=8, temperature=0.0, stop_at_eot=False), return_tokens=True)
    k = gen.generate(["x = "], SamplingOptions(length=8, top_k=1, seed=3, stop_at_eot=False), return_tokens=True)
    assert g == k


def test_filters():
    logits = jnp.log(jnp.array([[0.5, 0.25, 0.15, 0.1]]))
    seen = jnp.zeros((1, 4), bool)
    top2 = filter_logits(logits, seen, SamplingOptions(top_k=2))
    assert np.isfinite(np.asarray(top2)).tolist() == [[True, True, False, False]]
    nucleus = filter_logits(logits, seen, SamplingOptions(top_p=0.7))   # 0.5 + 0.25 reaches 0.7
    assert np.isfinite(np.asarray(nucleus)).tolist() == [[True, True, False, False]]
    tiny = filter_logits(logits, seen, SamplingOptions(top_p=0.01))     # always keeps the best one
    assert np.isfinite(np.asarray(tiny)).tolist() == [[True, False, False, False]]
    hot = filter_logits(jnp.array([[2.0, -2.0]]), jnp.array([[True, True]]),
                        SamplingOptions(repetition_penalty=2.0, temperature=1.0))
    np.testing.assert_allclose(hot, [[1.0, -4.0]])  # positive logits divided, negative multiplied
    cold = filter_logits(logits, seen, SamplingOptions(temperature=0.5))
    np.testing.assert_allclose(cold, logits / 0.5, rtol=1e-6)


def test_repetition_penalty_changes_greedy_text(gen):
    base = gen.generate(["the the the"], SamplingOptions(length=16, temperature=0.0, stop_at_eot=False),
                        return_tokens=True)[0]
    pen = gen.generate(["the the the"], SamplingOptions(length=16, temperature=0.0, repetition_penalty=5.0,
                                                        stop_at_eot=False), return_tokens=True)[0]
    assert base != pen
    assert len(set(pen)) > len(set(base))


def test_stops_at_end_of_text_after_the_text_before_it(gpt2_tokenizer):
    """A model that says " the" up to position 4 and <|endoftext|> from position 5 on (its blocks
    add nothing; its logits come from the position embedding alone): each row's text is the words
    before <|endoftext|>, and nothing after it."""
    cfg = Config(n_ctx=32, n_embd=16, n_layer=1, n_head=2, n_vocab=50257).validate()
    params = M.init_params(cfg, jax.random.PRNGKey(0))
    params["h"] = jax.tree.map(jnp.zeros_like, params["h"])
    word, eot = gpt2_tokenizer.encode(" the")[0], gpt2_tokenizer.eot_id
    e0, e1 = jnp.eye(16)[0], jnp.eye(16)[1]
    params["wte"] = jnp.zeros_like(params["wte"]).at[word].set(e0).at[eot].set(e1)  # the tied head reads these
    says_word = jnp.arange(cfg.n_ctx)[:, None] < 4                                  # position p predicts p + 1
    params["wpe"] = 10 * jnp.where(says_word, e0 - e1, e1 - e0)
    g = Generator(cfg, params, gpt2_tokenizer)
    prompts = ["hi", "hi hi hi"]
    lengths = [len(gpt2_tokenizer.encode(p)) for p in prompts]
    assert lengths == [1, 3]
    texts = g.generate(prompts, SamplingOptions(length=8, temperature=0.0))
    assert texts == [" the" * (5 - n) for n in lengths] and all(texts)
    # Without the stop the same rows go on past <|endoftext|>: stopping is what ended them.
    tokens = g.generate(prompts, SamplingOptions(length=8, temperature=0.0, stop_at_eot=False), return_tokens=True)
    assert tokens == [[word] * (5 - n) + [eot] * (3 + n) for n in lengths]


def test_long_prompt_keeps_its_last_tokens_with_a_warning(gen):
    long_prompt = " ".join(str(i) for i in range(200))
    with pytest.warns(UserWarning, match="longer than the 64-token context"):
        encoded = gen.encode_prompts([long_prompt])
    assert encoded[0] == gen.tok.encode(long_prompt)[-63:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = gen.generate([long_prompt], SamplingOptions(length=10, stop_at_eot=False), return_tokens=True)
    assert len(out[0]) == 10


def test_generation_slides_past_the_end_of_the_context(gen):
    """150 tokens after a 21-token prompt in a 64-token context: the first 43 are what a
    generation stopping at the context gives; then it goes on from the last 32 tokens, as the
    model run on just those tokens predicts."""
    prompt = "The quick brown fox jumps over the lazy dog. " * 2
    ids = gen.tok.encode(prompt)
    opts = SamplingOptions(length=150, temperature=0.0, stop_at_eot=False)
    out = gen.generate([prompt, "a"], opts, return_tokens=True)
    assert [len(x) for x in out] == [150, 150]
    room = 64 - len(ids)
    first = gen.generate([prompt], SamplingOptions(length=room, temperature=0.0, stop_at_eot=False),
                         return_tokens=True)[0]
    assert out[0][:room] == first
    text = ids + out[0]
    window = text[len(ids) + room - 32:len(ids) + room]  # the last half-context when the cache filled
    want, params = [], stacked_params(gen.cfg)
    forward = jax.jit(lambda params, tokens: M.forward(params, tokens, gen.cfg))
    width = len(window) + 20  # one padded shape (causal: the padding after a position changes nothing), one compile
    for _ in range(20):
        known = window + want
        logits = forward(params, jnp.asarray([known + [0] * (width - len(known))]))[0, len(known) - 1]
        want.append(int(jnp.argmax(logits)))
    assert out[0][room:room + 20] == want
    # Sampling past the context is reproducible too.
    sampled = SamplingOptions(length=100, temperature=1.0, seed=4, stop_at_eot=False)
    assert gen.generate([prompt], sampled, return_tokens=True) == gen.generate([prompt], sampled, return_tokens=True)


def test_streaming_pieces_add_up_to_the_text(gen):
    pieces = {0: [], 1: []}
    opts = SamplingOptions(length=30, seed=1, stop_at_eot=False)
    texts = gen.generate(["Once upon", "In 1999"], opts, on_text=lambda i, t: pieces[i].append(t))
    assert ["".join(pieces[i]) for i in (0, 1)] == texts
    assert len(pieces[0]) > 1  # really streamed, in several chunks


def test_bad_options_are_user_errors():
    for bad in (dict(length=0), dict(temperature=-1), dict(top_p=0.0), dict(top_k=-1),
                dict(repetition_penalty=0)):
        with pytest.raises(UserError):
            SamplingOptions(**bad).check()


def test_banner_format():
    assert format_sample(3, "hi") == "=" * 40 + " SAMPLE 3 " + "=" * 40 + "\nhi\n" + "=" * 80 + "\n"


def test_first_argmax_picks_the_first_of_tied_maxima():
    from gpt2train.sampling import first_argmax
    x = jnp.array([[1.0, 3.0, 3.0, 2.0], [-jnp.inf, -jnp.inf, 0.5, 0.5], [0.0, 0.0, 0.0, 0.0]])
    assert first_argmax(x).tolist() == jnp.argmax(x, axis=-1).tolist() == [1, 2, 0]


@pytest.fixture(scope="module")
def fixed_distribution(gpt2_tokenizer):
    """A Generator whose model predicts the same logits at every position, and those logits:
    blocks that add nothing, a final LayerNorm that outputs e_0 whatever comes in (gain 0, bias
    e_0), and column 0 of the tied wte holding the chosen logits."""
    cfg = Config(n_ctx=96, n_embd=16, n_layer=1, n_head=2, n_vocab=50257).validate()
    params = M.init_params(cfg, jax.random.PRNGKey(0))
    params["h"] = jax.tree.map(jnp.zeros_like, params["h"])
    params["ln_f"] = {"scale": jnp.zeros(16), "bias": jnp.eye(16)[0]}
    chosen = 3 * jax.random.normal(jax.random.PRNGKey(1), (cfg.n_vocab,))
    params["wte"] = params["wte"].at[:cfg.n_vocab, 0].set(chosen)
    logits = M.forward(params, jnp.zeros((1, 4), jnp.int32), cfg)[0]  # [4, V_pad], padded rows masked
    assert np.array_equal(logits[0], logits[3]) and np.array_equal(logits[0, :cfg.n_vocab], chosen)
    return Generator(cfg, params, gpt2_tokenizer, chunk=16), logits[0]


@pytest.mark.parametrize("temperature, top_k", [(1.0, 0), (0.7, 0), (1.3, 40)])
def test_sampler_draws_what_jax_random_categorical_draws(fixed_distribution, temperature, top_k):
    """Sampling through Generator.generate (the compiled decode loop and its sampler) draws exactly
    the tokens jax.random.categorical draws from the same logits with the same keys: the loop
    draws the token for cache slot s with fold_in(PRNGKey(seed), s), and prompts shorter than
    PROMPT_BUCKET take slots 0..31."""
    gen, logits = fixed_distribution
    prompts, length, seed = ["a", "b c", "d e f"], 40, 11
    got = gen.generate(prompts, SamplingOptions(length=length, temperature=temperature, top_k=top_k, seed=seed,
                                                stop_at_eot=False), return_tokens=True)
    scaled = logits / temperature
    if top_k:
        scaled = jnp.where(scaled < jnp.sort(scaled)[-top_k], -jnp.inf, scaled)
    rows = jnp.broadcast_to(scaled, (len(prompts), scaled.shape[0]))
    key = jax.random.PRNGKey(seed)
    want = np.stack([jax.random.categorical(jax.random.fold_in(key, PROMPT_BUCKET + i), rows)
                     for i in range(length)], axis=1)
    assert got == want.tolist()
    drawn = np.asarray(got).ravel()
    assert len(set(drawn)) > 10 and len({tuple(r) for r in got}) == len(prompts)  # draws vary by step and row
    if top_k:
        assert set(drawn) <= set(np.argsort(np.asarray(logits))[-top_k:].tolist())


@pytest.mark.parametrize("bad, words", [
    (dict(temperature=float("nan")), "temperature must be a finite number"),
    (dict(top_p=float("inf")), "top_p must be a finite number"),
    (dict(length=True), "length must be an integer"),
    (dict(top_k=2.0), "top_k must be an integer"),
    (dict(seed=2**64), "seed must be in [0, 4294967296)"),
    (dict(seed=-1), "seed must be in [0, 4294967296)"),
    (dict(stop_at_eot=1), "stop_at_eot must be true or false"),
])
def test_options_reject_what_would_break_decoding(bad, words):
    with pytest.raises(UserError) as e:
        SamplingOptions(**bad).check()
    assert words in str(e.value)


def test_option_defaults_from_the_config_and_flags_from_the_declarations():
    import argparse
    from gpt2train.cli import add_sampling_flags
    from gpt2train.sampling import option_fields
    cfg = Config(n_ctx=64, seed=11).validate()
    opts = SamplingOptions.from_values({"top_k": 5, "temperature": None}, cfg)
    assert (opts.length, opts.seed, opts.top_k, opts.temperature) == (32, 11, 5, 1.0)
    parser = argparse.ArgumentParser()
    add_sampling_flags(parser)
    args = parser.parse_args(["--top_p", "0.5", "--stop_at_eot", "false", "--length", "7"])
    for f in option_fields():  # every option is a flag, absent ones None
        assert hasattr(args, f.name)
    opts = SamplingOptions.from_values(vars(args), cfg)
    assert (opts.top_p, opts.stop_at_eot, opts.length, opts.seed) == (0.5, False, 7, 11)


def test_batches_of_a_prompt_file_each_get_their_own_seed(gen):
    from gpt2train.generate import generate_batches
    opts = SamplingOptions(length=6, seed=SEED_NEAR_LIMIT, stop_at_eot=False)
    batches = list(generate_batches(gen, ["a", "b", "c"], opts, batch_size=2, samples=2))
    assert [b.first for b in batches] == [0, 2, 4] and all(len(b.texts) == 2 for b in batches)
    rows = ["a", "a", "b", "b", "c", "c"]
    for b in batches:  # the seed moves by the batch's first row, wrapping at the seed limit
        shifted = SamplingOptions(length=6, seed=(SEED_NEAR_LIMIT + b.first) % 2**32, stop_at_eot=False)
        assert b.texts == gen.generate(rows[b.first:b.first + 2], shifted)
    assert batches[0].texts[0] != batches[0].texts[1]  # two samples of one prompt differ


SEED_NEAR_LIMIT = 2**32 - 3


@pytest.mark.parametrize("amx", [False, True])
def test_kernel_layout_follows_the_cpu_and_decodes_the_same(gpt2_tokenizer, monkeypatch, amx):
    """Several rows read [out, in] kernels on CPUs with AMX and [in, out] ones elsewhere (one row
    always [out, in]: kernels.decode_transposed); either way, a batch decodes what each of its
    prompts decodes alone."""
    from gpt2train import kernels
    monkeypatch.setattr(kernels, "cpu_flags", lambda: frozenset({"avx512f", "amx_bf16"} if amx else {"avx512f"}))
    cfg = Config(n_ctx=64, n_embd=64, n_layer=2, n_head=4, n_vocab=50257).validate()
    g = Generator(cfg, stacked_params(cfg), gpt2_tokenizer, chunk=8)
    opts = SamplingOptions(length=10, temperature=0.0, stop_at_eot=False)
    prompts = ["The meaning of life is", "def f(x):", "Once upon a time", "1, 2, 3,"]
    alone = [g.generate([p], opts, return_tokens=True)[0] for p in prompts]
    assert "kernel_t" in g.params_for(1)["layers"][0]["mlp"]["c_fc"]
    together = g.generate(prompts, opts, return_tokens=True)
    assert ("kernel_t" in g.params_for(len(prompts))["layers"][0]["mlp"]["c_fc"]) == amx
    assert together == alone
