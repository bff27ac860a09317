"""The server's sampler (every setting per row, as data) keeps exactly the tokens the CLI's
sampler keeps for each row alone: top-k within and past the 64 ranked candidates, nuclei narrow
and wide, temperatures, penalties, greedy rows."""

import jax
import jax.numpy as jnp
import numpy as np

from gpt2train.sampling import TOP_CANDIDATES, RowSettings, SamplingOptions, filter_logits, filter_rows, sample_rows

V = 50304
CASES = [  # temperature, top_k, top_p, repetition_penalty
    (1.0, 40, 1.0, 1.0), (0.7, 0, 0.9, 1.0), (1.0, 100, 0.95, 1.0), (1.3, 5000, 1.0, 1.0), (1.0, 0, 0.5, 1.0),
    (0.5, 70, 0.3, 1.0), (0.0, 0, 1.0, 1.3), (1.0, 0, 1.0, 1.0), (0.9, TOP_CANDIDATES, 0.999, 1.2), (2.0, 1, 0.2, 1.0),
]


def logits_and_seen():
    scales = jnp.array([3.0, 1.0, 0.3, 5.0, 2.0, 8.0, 1.0, 0.5, 0.05, 4.0])[:, None]
    logits = jax.random.normal(jax.random.PRNGKey(0), (len(CASES), V)) * scales
    seen = jax.random.bernoulli(jax.random.PRNGKey(1), 0.001, (len(CASES), V))
    return logits, seen


def rows():
    t, k, p, r = (np.array(c) for c in zip(*CASES))
    return RowSettings(jnp.float32(t), jnp.int32(k), jnp.float32(p), jnp.float32(r))


def test_each_row_keeps_what_the_single_row_sampler_keeps():
    logits, seen = logits_and_seen()
    got = np.asarray(jax.jit(filter_rows)(logits, seen, rows()))
    kept_counts = []
    for i, (t, k, p, r) in enumerate(CASES):
        want = np.asarray(filter_logits(logits[i:i + 1], seen[i:i + 1], SamplingOptions(
            temperature=t, top_k=k, top_p=p, repetition_penalty=r)))[0]
        assert (np.isfinite(got[i]) == np.isfinite(want)).all(), (i, CASES[i])
        kept_counts.append(int(np.isfinite(want).sum()))
    # the cases reach both paths: within the candidates and past them (k > 64, wide nuclei)
    assert min(kept_counts) == 1 and max(kept_counts) > 10 * TOP_CANDIDATES


def test_a_row_draws_the_same_token_whatever_the_other_rows_hold():
    logits, seen = logits_and_seen()
    keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(len(CASES)))
    sample = jax.jit(sample_rows)
    together = np.asarray(sample(logits, seen, keys, rows()))
    greedy_rest = rows()._replace(temperature=jnp.zeros(len(CASES)).at[3].set(CASES[3][0]))
    shuffled = jnp.roll(logits, 1, axis=0).at[3].set(logits[3])
    alone = np.asarray(sample(shuffled, seen, keys, greedy_rest._replace(
        top_k=rows().top_k, top_p=rows().top_p)))
    assert together[3] == alone[3]
    assert together[6] == int(jnp.argmax(jnp.where(seen[6], jnp.where(logits[6] > 0, logits[6] / 1.3,
                                                                      logits[6] * 1.3), logits[6])))
