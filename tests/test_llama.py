"""LLaMA: logits parity with transformers on tiny random checkpoints (GQA/MHA, tied/untied, biases, RoPE scaling),
unsupported RoPE types, KV cache in chunks, and the per-layer protocol the quantizer uses."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax.traverse_util import flatten_dict  # noqa: E402

import models  # noqa: E402
from models.common import (CAUSAL_BLOCK, attention_mask, dot_product_attention, init_cache,  # noqa: E402
                           rope_inverse_frequencies)

BATCH, SEQ = 2, 13
ORIGINAL_MAX = 64  # llama3 rope: with head_dim 16 and theta 1e4 the wavelengths straddle 64/4 .. 64/1 (all 3 branches)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": ORIGINAL_MAX}
LINEAR_ROPE = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}

CASES = {
    "gqa-tied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "mha-untied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
    "bias": dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=False),
    "rope-llama3": dict(rope_parameters=LLAMA3_ROPE),
    "rope-linear": dict(rope_parameters=LINEAR_ROPE),
}


def _far_positions(rng, batch=BATCH, seq=SEQ):
    """Positions well past original_max_position_embeddings (different start per row)."""
    start = rng.integers(5 * ORIGINAL_MAX, 14 * ORIGINAL_MAX, size=(batch, 1))
    return (start + np.arange(seq)[None]).astype(np.int32)


def _check_layout(name, hf):
    c, attn = hf.config, hf.model.layers[0].self_attn
    tied = hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    assert tied == c.tie_word_embeddings
    assert attn.k_proj.out_features == c.num_key_value_heads * 16 and attn.q_proj.out_features == 64
    if name == "gqa-tied":
        assert c.num_key_value_heads == 2 and tied
    if name == "mha-untied":
        assert c.num_key_value_heads == 4 and not tied
    assert (attn.q_proj.bias is not None) == (name == "bias")
    assert (hf.model.layers[0].mlp.up_proj.bias is not None) == (name == "bias")
    expected_rope = {"rope-llama3": "llama3", "rope-linear": "linear"}.get(name, "default")
    assert hf.config.rope_parameters["rope_type"] == expected_rope
    assert hf.model.rotary_emb.rope_type == expected_rope


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(tiny_llama, rel_err, rng, name):
    b = tiny_llama(**CASES[name])
    _check_layout(name, b.hf)
    ids = rng.integers(0, 128, size=(BATCH, SEQ)).astype(np.int32)
    pos = _far_positions(rng) if name.startswith("rope") else None
    ref = b.hf_logits(ids, pos)
    logits, cache = b.loaded(jnp.asarray(ids), positions=None if pos is None else jnp.asarray(pos))
    assert cache is None and logits.dtype == jnp.float32 and logits.shape == ref.shape == (BATCH, SEQ, 128)
    err = rel_err(logits, ref)
    assert err < 1e-4, f"{name}: max|diff|/max|ref| = {err:.2e} (weight seed {b.seed})"
    if name.startswith("rope"):
        assert dict(b.loaded.config.rope)["rope_type"] == CASES[name]["rope_parameters"]["rope_type"]


def test_long_sequence_block_causal_path_matches_transformers(tiny_llama, rel_err, rng):
    """Past CAUSAL_BLOCK tokens the attention runs block by block over the causal prefix only (not a multiple of
    the block here, so the last block is short)."""
    seq = 2 * CAUSAL_BLOCK + 37
    b = tiny_llama(**CASES["gqa-tied"])
    ids = rng.integers(0, 128, size=(1, seq)).astype(np.int32)
    ref = b.hf_logits(ids, None)
    logits, _ = b.loaded(jnp.asarray(ids))
    err = rel_err(logits, ref)
    assert err < 1e-4, f"max|diff|/max|ref| = {err:.2e} (weight seed {b.seed})"


def _attention_oracle(q, k, v, probs_fn, grid=None):
    """float64 numpy causal GQA attention: q [B,T,H,D], k/v [B,T,KV,D]. With ``grid`` (probabilities rounded to
    multiples of 1/grid by ``probs_fn``) also a per-output bound [B,T,H,D] on what float32 probabilities may change:
    a probability within 1e-4 grid steps of a rounding midpoint may round either way, moving the output by |v| / grid."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    t, h, kv = q.shape[1], q.shape[2], k.shape[2]
    k, v = np.repeat(k, h // kv, axis=2), np.repeat(v, h // kv, axis=2)
    scores = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)
    out = np.einsum("bhts,bshd->bthd", probs_fn(p), v)
    if grid is None:
        return out
    steps = p * grid
    near_midpoint = np.abs(steps - np.floor(steps) - 0.5) < 1e-4
    return out, np.einsum("bhts,bshd->bthd", near_midpoint.astype(np.float64), np.abs(v)) / grid


@pytest.mark.parametrize("quantize_probs", [False, True])
def test_block_causal_attention_matches_oracle(rng, quantize_probs):
    """mask=None (block-causal) and an explicit causal mask both match a float64 oracle, with an elementwise
    "probs" hook applied (RPTQ's fixed 1/255 grid) or not."""
    t = CAUSAL_BLOCK + 61
    q = rng.standard_normal((2, t, 6, 16)).astype(np.float32)
    k, v = (rng.standard_normal((2, t, 2, 16)).astype(np.float32) for _ in range(2))

    def act(name, x):
        return jnp.round(x * 255) / 255 if (quantize_probs and name == "probs") else x

    probs_fn = (lambda p: np.round(p * 255) / 255) if quantize_probs else (lambda p: p)
    want, flips = _attention_oracle(q, k, v, probs_fn, grid=255)
    blocked = dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), attention_mask(t, t), act=act)
    dense = dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                  jnp.tril(jnp.ones((t, t), bool))[None, None], act=act)
    assert attention_mask(t, t) is None
    # rounding to the 1/255 grid can flip a step where float32 and float64 probabilities straddle a midpoint: each
    # output may move by |v| / 255 per such probability (``flips``), and by float32 rounding beside that
    tol = 1e-5 + (flips if quantize_probs else 0)
    for got in (blocked, dense):
        err = np.abs(np.asarray(got, np.float64) - want)
        assert np.all(err <= tol), f"max error beyond the bound {np.max(err - tol)}"
    err = np.abs(np.asarray(blocked, np.float64) - np.asarray(dense, np.float64))
    assert np.all(err <= 2 * tol)  # each path within its bound of the oracle


def test_causal_path_off_cpu_is_one_masked_pass(rng, monkeypatch):
    """Off the CPU (``causal_block() is None``) mask=None runs one masked pass: same oracle, and no per-block
    programs (the jaxpr has one scores and one output matmul, not two per block)."""
    import models.common as common

    t = 2 * CAUSAL_BLOCK + 19
    q = rng.standard_normal((1, t, 4, 8)).astype(np.float32)
    k, v = (rng.standard_normal((1, t, 2, 8)).astype(np.float32) for _ in range(2))
    def matmuls():  # a fresh function each time: make_jaxpr caches traces by function
        return str(jax.make_jaxpr(lambda q, k, v: dot_product_attention(q, k, v, None))(q, k, v)).count("dot_general")

    blocked_eqns = matmuls()
    monkeypatch.setattr(common, "causal_block", lambda: None)
    got = dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), None)
    np.testing.assert_allclose(np.asarray(got), _attention_oracle(q, k, v, lambda p: p), atol=1e-5, rtol=0)
    assert matmuls() == 2 < blocked_eqns


def test_rope_scaling_changes_logits_in_both_implementations(tiny_llama, rel_err, rng):
    """Same weights, three RoPE configs: transformers gives three different results far past original_max, and ours
    follows each of them (so the parity above really exercised the scaling)."""
    b = tiny_llama(**CASES["rope-llama3"])
    ids = rng.integers(0, 128, size=(BATCH, SEQ)).astype(np.int32)
    pos = _far_positions(rng)
    hf_out, ours = {}, {}
    for kind, rope in [("default", {"rope_type": "default", "rope_theta": 10000.0}), ("linear", LINEAR_ROPE),
                       ("llama3", LLAMA3_ROPE)]:
        cfg = transformers.LlamaConfig(**{**b.config, "rope_parameters": rope})
        hf = transformers.LlamaForCausalLM(cfg).eval()
        hf.load_state_dict(b.hf.state_dict())
        with torch.no_grad():
            hf_out[kind] = hf(torch.from_numpy(ids).long(), position_ids=torch.from_numpy(pos).long(),
                              use_cache=False).logits.numpy()
        _, _, module = models.build(cfg.to_dict())
        ours[kind] = np.asarray(module.apply({"params": b.loaded.params}, jnp.asarray(ids), jnp.asarray(pos))[0])
        assert rel_err(ours[kind], hf_out[kind]) < 1e-4, kind
    for a, c in [("default", "linear"), ("default", "llama3"), ("linear", "llama3")]:
        assert rel_err(hf_out[a], hf_out[c]) > 1e-3, f"transformers ignores the {a} vs {c} difference"
        assert rel_err(ours[a], ours[c]) > 1e-3, f"ours ignores the {a} vs {c} difference"


def test_legacy_rope_scaling_spelling(tiny_llama):
    """``rope_scaling`` + ``rope_theta`` (transformers 4.x config.json) reads the same as ``rope_parameters``."""
    base = {k: v for k, v in tiny_llama().hf.config.to_dict().items()
            if k not in ("rope_parameters", "rope_scaling", "rope_theta")}
    legacy = models.build({**base, "rope_theta": 500.0, "rope_scaling": {"type": "linear", "factor": 4.0}})[1]
    new = models.build({**base, "rope_parameters": {"rope_type": "linear", "rope_theta": 500.0, "factor": 4.0}})[1]
    plain = models.build({**base, "rope_theta": 500.0})[1]
    assert dict(legacy.rope) == dict(new.rope) == {"rope_type": "linear", "rope_theta": 500.0, "factor": 4.0}
    assert dict(plain.rope) == {"rope_type": "default", "rope_theta": 500.0}
    inv_plain = rope_inverse_frequencies(16, dict(plain.rope))
    np.testing.assert_allclose(inv_plain, 500.0 ** (-np.arange(0, 16, 2) / 16), rtol=1e-6)
    np.testing.assert_allclose(rope_inverse_frequencies(16, dict(legacy.rope)), inv_plain / 4.0, rtol=1e-6)


@pytest.mark.parametrize("rope", [{"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
                                  {"rope_type": "dynamic", "factor": 2.0},
                                  {"type": "longrope", "factor": 2.0}])
def test_unsupported_rope_type_raises(tiny_llama, tmp_path, rope):
    kind = rope.get("rope_type") or rope["type"]
    b = tiny_llama()
    directory = tmp_path / kind
    shutil.copytree(b.dir, directory)
    with open(directory / "config.json") as f:
        cfg = json.load(f)
    cfg.pop("rope_parameters", None)
    cfg["rope_scaling"] = rope
    with open(directory / "config.json", "w") as f:
        json.dump(cfg, f)
    with pytest.raises(NotImplementedError, match=f"rope_type '{kind}' is not supported"):
        models.from_pretrained(str(directory), tokenizer=False)


def test_kv_cache_two_chunks_match_full_forward(tiny_llama, rng):
    m = tiny_llama().loaded
    ids = jnp.asarray(rng.integers(0, 128, size=(BATCH, SEQ)).astype(np.int32))
    full, _ = m(ids)
    first = int(rng.integers(1, SEQ - 1))
    capacity = 16
    cache = init_cache(m.config.num_layers, BATCH, capacity, *m.config.kv_cache_shape, jnp.float32)
    step = jax.jit(lambda params, ids, pos, cache, idx: m.module.apply({"params": params}, ids, positions=pos,
                                                                       cache=cache, cache_index=idx))
    pos = jnp.broadcast_to(jnp.arange(SEQ), ids.shape)
    out1, cache = step(m.params, ids[:, :first], pos[:, :first], cache, 0)
    out2, cache = step(m.params, ids[:, first:], pos[:, first:], cache, first)
    assert len(cache) == 2 and cache[0]["k"].shape == (BATCH, capacity, 2, 16)
    # The cache holds exactly the keys of the SEQ tokens; the slots past them are untouched.
    assert float(jnp.max(jnp.abs(cache[1]["k"][:, SEQ:]))) == 0.0
    assert float(jnp.min(jnp.max(jnp.abs(cache[1]["k"][:, :SEQ]), axis=(2, 3)))) > 0.0
    chunked = jnp.concatenate([out1, out2], axis=1)
    err = float(jnp.max(jnp.abs(chunked - full)))
    assert err < 1e-5 * max(1.0, float(jnp.max(jnp.abs(full)))), f"split at {first}: {err:.2e}"


def test_layerwise_protocol(tiny_llama, rng):
    """embed -> each DecoderLayer alone on params['layers_i'] -> head equals __call__; SEQUENTIAL_GROUPS cover every
    kernel and every kernel's input is sown."""
    m = tiny_llama(**CASES["bias"]).loaded
    fam, params = m.family, m.params
    ids = jnp.asarray(rng.integers(0, 128, size=(BATCH, SEQ)).astype(np.int32))
    pos = jnp.broadcast_to(jnp.arange(SEQ), ids.shape)
    full, _ = m(ids, positions=pos)
    h = m.module.apply({"params": params}, ids, pos, method="embed")
    assert h.shape == (BATCH, SEQ, 64)
    layer = fam.DecoderLayer(m.config, m.dtype)
    grouped = {p for g in fam.SEQUENTIAL_GROUPS for p in g}
    assert sum(len(g) for g in fam.SEQUENTIAL_GROUPS) == len(grouped) == 7
    for i in range(m.config.num_layers):
        lp = params[f"layers_{i}"]
        kernels = {"/".join(k[:-1]) for k in flatten_dict(lp) if k[-1] == "kernel"}
        assert kernels == grouped
        (h, cache), state = layer.apply({"params": lp}, h, pos, mutable=["intermediates"])
        assert cache is None
        sown = {"/".join(k[:-1]) for k in flatten_dict(state["intermediates"])}
        assert grouped <= sown
    logits = m.module.apply({"params": params}, h, method="head")
    scale = float(jnp.max(jnp.abs(full)))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(full), rtol=0, atol=1e-6 * scale)
