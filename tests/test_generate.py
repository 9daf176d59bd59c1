"""Generation with the KV cache: greedy tokens equal transformers' for left-padded batches, no recompilation for
repeated shapes, nucleus sampling (tiny top_p == greedy, the kept set and frequencies vs a numpy oracle), seeds, EOS."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from models.generate import _generate, generate, sample_top_p  # noqa: E402

NEW = 8


@pytest.fixture(scope="module")
def lm(tiny_llama):
    return tiny_llama()


def _prompts(rng):
    """Two prompts of different lengths (the shorter one is left-padded inside generate)."""
    short, long_ = int(rng.integers(2, 7)), int(rng.integers(8, 15))
    return [rng.integers(0, 128, size=n).tolist() for n in (short, long_)]


def _hf_greedy(b, prompt, n):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = b.hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                            pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _assert_same_greedy(b, prompt, ours, theirs):
    """Token-for-token equality; a difference is tolerated only at an exact near-tie of transformers' top two logits
    (a float32 rounding decision, not a bug) - anything else fails."""
    if ours == theirs:
        return
    j = next((i for i, (a, c) in enumerate(zip(ours, theirs)) if a != c), min(len(ours), len(theirs)))
    assert j < min(len(ours), len(theirs)), f"lengths differ: ours {ours}, transformers {theirs}"
    logits = b.hf_logits([prompt + theirs[:j]])[0, -1]
    top = np.sort(logits)[::-1]
    gap = float(top[0] - top[1])
    assert {ours[j], theirs[j]} == set(np.argsort(logits)[::-1][:2].tolist()) and gap < 1e-5 * np.abs(top).max(), (
        f"prompt {prompt}: ours {ours} vs transformers {theirs} differ at {j} (top-2 gap {gap:.3g})")


def test_greedy_matches_transformers_with_left_padding(lm, rng):
    prompts = _prompts(rng)
    outs = generate(lm.loaded.module, lm.loaded.params, prompts, max_new_tokens=NEW)
    assert [len(o) for o in outs] == [NEW, NEW]
    for prompt, ours in zip(prompts, outs):
        _assert_same_greedy(lm, prompt, ours, _hf_greedy(lm, prompt, NEW))
    # Each row alone gives the same tokens as in the batch (padding and the other row do not leak in).
    alone = generate(lm.loaded.module, lm.loaded.params, prompts[:1], max_new_tokens=NEW)
    assert alone[0] == outs[0]


def test_no_recompilation_for_same_shapes(lm, rng):
    m = lm.loaded
    n = 5  # a max_new_tokens no other test uses: the first call must compile once
    before = _generate._cache_size()
    first = generate(m.module, m.params, _prompts(rng), max_new_tokens=n)
    after_first = _generate._cache_size()
    assert after_first == before + 1
    # New prompts, same padded width (pad_to=16) and batch: served from the cache.
    second = generate(m.module, m.params, _prompts(rng), max_new_tokens=n)
    third = generate(m.module, m.params, [rng.integers(0, 128, size=16).tolist()] * 2, max_new_tokens=n)
    assert _generate._cache_size() == after_first
    assert len(first) == len(second) == len(third) == 2
    # A longer prompt (width 32) is a new shape: one more program.
    generate(m.module, m.params, [rng.integers(0, 128, size=17).tolist()] * 2, max_new_tokens=n)
    assert _generate._cache_size() == after_first + 1


def test_tiny_top_p_is_greedy(lm, rng):
    m = lm.loaded
    prompts = _prompts(rng)
    greedy = generate(m.module, m.params, prompts, max_new_tokens=NEW)
    nucleus = generate(m.module, m.params, prompts, max_new_tokens=NEW, temperature=1.0, top_p=1e-6,
                       seed=int(rng.integers(1 << 30)))
    assert nucleus == greedy


def test_seeds(lm, rng):
    m = lm.loaded
    prompts = _prompts(rng)
    seed = int(rng.integers(1 << 30))
    a = generate(m.module, m.params, prompts, max_new_tokens=NEW, temperature=1.0, seed=seed)
    b = generate(m.module, m.params, prompts, max_new_tokens=NEW, temperature=1.0, seed=seed)
    c = generate(m.module, m.params, prompts, max_new_tokens=NEW, temperature=1.0, seed=seed + 1)
    greedy = generate(m.module, m.params, prompts, max_new_tokens=NEW)
    assert a == b
    assert a != c  # 16 tokens from near-flat distributions over 128: equal by chance ~never
    assert a != greedy


def test_top_p_keeps_the_nucleus_with_its_probabilities(rng):
    """Sampling many rows of the same logits: the tokens seen are exactly the nucleus a numpy oracle computes (the
    token that crosses top_p included), at the renormalized probabilities."""
    vocab, rows, top_p, temperature = 12, 4000, float(rng.uniform(0.4, 0.8)), float(rng.uniform(0.7, 1.5))
    logits = rng.normal(size=vocab) * 1.5
    p = np.exp(logits / temperature - np.max(logits / temperature))
    p /= p.sum()
    order = np.argsort(-p)
    k = int(np.searchsorted(np.cumsum(p[order]), top_p) + 1)  # smallest k with cum[k-1] >= top_p
    nucleus = set(order[:k].tolist())
    samples = np.asarray(sample_top_p(jnp.asarray(np.tile(logits, (rows, 1)), jnp.float32),
                                      jax.random.PRNGKey(int(rng.integers(1 << 30))), temperature, top_p))
    counts = np.bincount(samples, minlength=vocab)
    seen = set(np.nonzero(counts)[0].tolist())
    assert seen <= nucleus, f"sampled outside the nucleus: {seen - nucleus}"
    q = np.zeros(vocab)
    q[order[:k]] = p[order[:k]] / p[order[:k]].sum()
    sigma = np.sqrt(q * (1 - q) / rows)
    assert np.all(np.abs(counts / rows - q) <= 5 * sigma + 1e-3), (counts / rows, q)
    assert {t for t in nucleus if q[t] > 0.01} <= seen


def test_eos_stops_a_row(lm, rng):
    m = lm.loaded
    prompts = _prompts(rng)
    full = generate(m.module, m.params, prompts, max_new_tokens=NEW)
    eos = full[0][0]  # the first greedy token of row 0
    cut = generate(m.module, m.params, prompts, max_new_tokens=NEW, eos_id=eos)
    assert cut[0] == [eos]
    expected_1 = full[1][: full[1].index(eos) + 1] if eos in full[1] else full[1]
    assert cut[1] == expected_1
    # EOS later in a row: cut right after its first occurrence.
    j = int(rng.integers(1, NEW))
    eos = full[1][j]
    cut = generate(m.module, m.params, prompts, max_new_tokens=NEW, eos_id=eos)
    for row, out in zip(full, cut):
        assert out == (row[: row.index(eos) + 1] if eos in row else row)
    assert cut[1][-1] == eos and len(cut[1]) <= j + 1


def test_argument_checks(lm):
    m = lm.loaded
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(m.module, m.params, [[1, 2]], max_new_tokens=0)
    with pytest.raises(ValueError, match="at least one token"):
        generate(m.module, m.params, [[1, 2], []])
    with pytest.raises(ValueError, match="top_p"):
        generate(m.module, m.params, [[1, 2]], temperature=1.0, top_p=0.0)


@pytest.mark.parametrize("t", [1, 3])
def test_decode_attention_output_is_materialized(rng, t):
    # A decode step (T = 1) puts an optimization barrier on P @ V, so that XLA cannot fuse that reduction into a
    # gathering consumer (the SpQR / act-order o_proj; bench/results/decode.md); longer queries are left alone.
    from models.common import dot_product_attention

    q = jnp.asarray(rng.standard_normal((2, t, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((2, 5, 2, 8)), jnp.float32) for _ in range(2))
    mask = jnp.ones((1, 1, t, 5), bool)
    text = jax.jit(dot_product_attention).lower(q, k, v, mask).as_text()
    assert ("optimization_barrier" in text) == (t == 1)
    # the barrier changes nothing numerically: plain softmax attention in float64
    qg = np.asarray(q, np.float64).reshape(2, t, 2, 2, 8)
    s = np.einsum("btkgd,bskd->bkgts", qg, np.asarray(k, np.float64)) / np.sqrt(8)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = np.einsum("bkgts,bskd->btkgd", p, np.asarray(v, np.float64)).reshape(2, t, 4, 8)
    np.testing.assert_allclose(np.asarray(dot_product_attention(q, k, v, mask)), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("steps_per_check", [3, 5])
def test_stop_checks_every_few_steps_give_the_same_tokens(lm, rng, steps_per_check):
    # NEW - 1 decode steps are not a multiple of the group: the last group runs past max_new_tokens, which must write
    # nothing; an EOS mid-group stops the rows as with a check every step
    m = lm.loaded
    prompts = _prompts(rng)
    every = generate(m.module, m.params, prompts, max_new_tokens=NEW, steps_per_check=1)
    grouped = generate(m.module, m.params, prompts, max_new_tokens=NEW, steps_per_check=steps_per_check)
    assert (NEW - 1) % steps_per_check and grouped == every and all(len(r) == NEW for r in grouped)
    eos = every[1][int(rng.integers(1, NEW - 1))]
    assert (generate(m.module, m.params, prompts, max_new_tokens=NEW, eos_id=eos, steps_per_check=steps_per_check)
            == generate(m.module, m.params, prompts, max_new_tokens=NEW, eos_id=eos, steps_per_check=1))
    with pytest.raises(ValueError, match="steps_per_check"):
        generate(m.module, m.params, prompts, steps_per_check=0)
