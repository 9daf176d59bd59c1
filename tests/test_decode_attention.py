"""The decode-step attention kernel (``pallas_kernels.decode_attention``) on the CPU, and the models' dispatch to it.

The Mosaic GPU kernel runs in ``bench/attn_probe.py`` on a GPU (its body is an ``inline_mgpu`` block, which Pallas'
interpreter cannot run); there every case is checked against the jnp reference with a NaN-poisoned output. Here:
the reference against a float64 numpy oracle (RoPE, grouped heads, fused q/k/v sources at offsets, key padding, the
roundings the models make), behaviours (masked and later slots never matter, the new token always counts, the index
clamps), the kernel's CUDA lowering, argument errors, and ``models.common.cached_attention``: its rule, and that a
decode step through the kernel's wiring (the reference standing in for the kernel) gives the XLA path's logits for
LLaMA (separate and fused q/k/v), OPT and Falcon.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re

import ml_dtypes
import numpy as np
import pytest

import flax.linen as nn
import jax
import jax.numpy as jnp

import models.common as mc
from pallas_kernels import decode_attention as da
from pallas_kernels.gptq_matmul import PartialSums

NP_DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def _round(x, dtype):
    return np.asarray(x).astype(NP_DTYPES[dtype]).astype(np.float64)


def numpy_oracle(q, k, v, ck, cv, idx, valid, pos, inv_freq, *, num_heads, offsets, dtype):
    """float64, rounding where the models round (rotated q / k, the new cache row, probabilities, output)."""
    q, k, v, ck, cv = (np.asarray(a, np.float64) for a in (q, k, v, ck, cv))
    b, s, kv, d = ck.shape
    g = num_heads // kv
    idx = min(max(int(idx), 0), s - 1)
    qh = q[:, offsets[0]:offsets[0] + num_heads * d].reshape(b, num_heads, d)
    kh = k[:, offsets[1]:offsets[1] + kv * d].reshape(b, kv, d)
    vh = v[:, offsets[2]:offsets[2] + kv * d].reshape(b, kv, d)
    if inv_freq is not None:
        r = len(inv_freq)
        # the angle as the models form it (a float32 product: at position ~4000 its rounding moves cos / sin by
        # ~1e-4), then float64
        ang = (np.asarray(pos, np.float32)[:, None] * np.asarray(inv_freq, np.float32)[None, :]).astype(np.float64)
        cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]

        def rope(x):
            x1, x2 = x[..., :r].copy(), x[..., r:2 * r].copy()
            out = x.copy()
            out[..., :r], out[..., r:2 * r] = x1 * cos - x2 * sin, x2 * cos + x1 * sin
            return _round(out, dtype)
        qh, kh = rope(qh), rope(kh)
    ck, cv = ck.copy(), cv.copy()
    ck[:, idx], cv[:, idx] = kh, vh
    out = np.zeros((b, num_heads, d))
    for bi in range(b):
        keys = [j for j in range(idx + 1) if j == idx or valid is None or valid[bi, j]]
        for h in range(num_heads):
            scores = np.array([qh[bi, h] @ ck[bi, j, h // g] for j in keys]) / math.sqrt(d)
            p = np.exp(scores - scores.max())
            p = _round(p / p.sum(), dtype)
            out[bi, h] = p @ np.stack([cv[bi, j, h // g] for j in keys])
    return _round(out.reshape(b, -1), dtype), ck, cv


def _case(rng, b, h, kv, s, d, dtype, rope_dims, fused, padding):
    dt = jnp.dtype(dtype)
    if fused:  # one [.. | q | k | v | ..] source at offsets, as a fused projection's output
        lead, tail = int(rng.integers(0, 5)), int(rng.integers(0, 5))
        src = jnp.asarray(rng.standard_normal((b, lead + (h + 2 * kv) * d + tail)), dt)
        srcs, offsets = (src, src, src), (lead, lead + h * d, lead + (h + kv) * d)
    else:
        srcs, offsets = tuple(jnp.asarray(rng.standard_normal((b, n * d)), dt) for n in (h, kv, kv)), (0, 0, 0)
    ck, cv = (jnp.asarray(rng.standard_normal((b, s, kv, d)), dt) for _ in range(2))
    valid = jnp.asarray(rng.random((b, s)) > 0.3) if padding else None
    pos = jnp.asarray(rng.integers(0, 4096, b), jnp.int32)
    inv = jnp.asarray(1.0 / 10000.0 ** (np.arange(0, rope_dims, 2) / rope_dims), jnp.float32) if rope_dims else None
    return srcs, ck, cv, valid, pos, inv, offsets


CASES = [  # (B, H, KV, S, D, dtype, RoPE dims, fused source, key padding)
    (1, 4, 4, 21, 64, "bfloat16", 64, True, False),
    (3, 8, 2, 37, 32, "bfloat16", 16, False, True),
    (2, 6, 3, 130, 16, "float16", 16, True, True),
    (1, 2, 1, 9, 128, "float16", 0, False, False),
]


@pytest.mark.parametrize("case", CASES)
def test_reference_matches_float64_oracle(rng, case):
    b, h, kv, s, d, dtype, rope_dims, fused, padding = case
    (q, k, v), ck, cv, valid, pos, inv, offsets = _case(rng, b, h, kv, s, d, dtype, rope_dims, fused, padding)
    for idx in (0, int(rng.integers(1, s - 1)), s - 1):
        out, nk, nv = da.reference_decode_attention(q, k, v, ck, cv, idx, valid, pos, inv, num_heads=h,
                                                    offsets=offsets)
        want, wk, wv = numpy_oracle(q, k, v, ck, cv, idx, None if valid is None else np.asarray(valid), pos,
                                    None if inv is None else np.asarray(inv), num_heads=h, offsets=offsets,
                                    dtype=dtype)
        assert out.shape == (b, h * d) and out.dtype == jnp.dtype(dtype)
        got = np.asarray(out, np.float64)
        err = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert err < (1e-2 if dtype == "bfloat16" else 2e-3), (case, idx, err)
        # the new rows: v exactly, k within the float32-vs-float64 rotation's rounding
        np.testing.assert_array_equal(np.asarray(nv, np.float64), wv)
        ulp = 2.0 ** -7 if dtype == "bfloat16" else 2.0 ** -10
        np.testing.assert_allclose(np.asarray(nk, np.float64), wk, rtol=2 * ulp, atol=1e-5)


def _slotted(rng, x, parts: int, m_pad: int):
    """x [B, F] -> float32 partial slots [P, F + pad, M_pad] whose sum over P is x (a random split; padding rows /
    columns random too, so reading them would show)."""
    b, f = x.shape
    x32 = np.asarray(x, np.float32)
    slots = rng.standard_normal((parts, f + 5, m_pad)).astype(np.float32)
    slots[-1, :f, :b] = x32.T - slots[:-1, :f, :b].sum(0)
    return jnp.asarray(slots)


def test_partial_slot_sources_are_summed_then_rounded(rng):
    b, h, kv, s, d, dtype = 3, 8, 2, 40, 32, "bfloat16"
    (src, _, _), ck, cv, valid, pos, inv, offsets = _case(rng, b, h, kv, s, d, dtype, d, True, True)
    slots = _slotted(rng, src.astype(jnp.float32), 3, 8)
    # the slot sum in float64, rounded once: the source the kernel reads
    want_src = _round(np.asarray(slots, np.float64).sum(0)[:, :b].T, dtype)
    got_src = np.asarray(da.source_values(slots, b, jnp.bfloat16), np.float64)
    np.testing.assert_allclose(got_src, want_src, rtol=2.0 ** -7)
    idx = int(rng.integers(0, s))
    got = da.reference_decode_attention(slots, slots, slots, ck, cv, idx, valid, pos, inv, num_heads=h,
                                        offsets=offsets)
    flat = da.source_values(slots, b, jnp.bfloat16)
    want = da.reference_decode_attention(flat, flat, flat, ck, cv, idx, valid, pos, inv, num_heads=h,
                                         offsets=offsets)
    for a, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(w, np.float32))
    assert got[0].dtype == jnp.bfloat16


def test_masked_and_later_slots_do_not_matter_and_the_new_token_counts(rng):
    b, h, kv, s, d = 2, 4, 2, 33, 32
    (q, k, v), ck, cv, valid, pos, inv, offsets = _case(rng, b, h, kv, s, d, "bfloat16", 32, False, True)
    idx = 20
    f = functools.partial(da.reference_decode_attention, num_heads=h, offsets=offsets)
    out = f(q, k, v, ck, cv, idx, valid, pos, inv)[0]
    masked = (np.arange(s)[None, :] > idx) | (~np.asarray(valid) & (np.arange(s)[None, :] != idx))
    junk = np.where(masked[:, :, None, None], np.nan, 1.0)
    out2 = f(q, k, v, ck * junk.astype(np.float32), cv * junk.astype(np.float32), idx, valid, pos, inv)[0]
    np.testing.assert_array_equal(np.asarray(out), np.asarray(out2))
    # only the new token's own slot valid: every query head returns its kv head's new v
    alone = f(q, k, v, ck, cv, idx, jnp.zeros((b, s), bool), pos, inv)[0]
    want = np.repeat(np.asarray(v).reshape(b, kv, d), h // kv, axis=1).reshape(b, h * d)
    np.testing.assert_array_equal(np.asarray(alone), want)
    # an index past the cache clamps to its last slot, as dynamic_update_slice does
    past = f(q, k, v, ck, cv, s + 7, None, pos, inv)
    last = f(q, k, v, ck, cv, s - 1, None, pos, inv)
    for a, c in zip(past, last):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))


def _lowered(b, h, kv, s, d, dtype, rope_dims, fused, poisoned, slots=0):
    rng = np.random.default_rng(0)
    (q, k, v), ck, cv, valid, pos, inv, offsets = _case(rng, b, h, kv, s, d, dtype, rope_dims, fused, True)
    if slots:
        q, k, v = (_slotted(rng, x.astype(jnp.float32), slots, max(8, b)) for x in (q, k, v))
    out = jnp.zeros((b, h * d), dtype) if poisoned else None
    f = functools.partial(da.decode_attention, num_heads=h, offsets=offsets, out=out)
    return jax.jit(f).trace(q, k, v, ck, cv, jnp.int32(3), valid, pos, inv).lower(
        lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("shape", [(1, 32, 32, 81, 128, "bfloat16", 128, True, False),
                                   (16, 8, 2, 300, 64, "float16", 32, False, True),
                                   (3, 4, 1, 17, 256, "bfloat16", 0, False, False),
                                   (1, 32, 32, 2048, 128, "bfloat16", 128, True, True),
                                   (2, 12, 4, 700, 64, "float16", 64, False, False)])
def test_kernel_lowers_for_cuda_with_the_cache_write_inside(shape):
    text = _lowered(*shape)
    assert text.count("custom_call @mosaic_gpu") == 1
    # the two caches (operands 7 and 8) and a given out buffer (9) are outputs of the call, written in place; no
    # XLA update left
    aliased = re.findall(r"output_operand_alias<output_tuple_indices = \[\d\], operand_index = (\d+),", text)
    assert sorted(aliased) == ["7", "8"] + (["9"] if shape[-1] else [])
    assert "dynamic_update_slice" not in text
    b, h, kv, s = shape[:4]
    # the cache rows' L2 prefetch where every CTA has one 128-slot chunk
    assert ("prefetch.global.L2" in text) == da.prefetches(s, da.cluster_parts(b, kv, s))
    assert da.prefetches(81, 1) == da.PREFETCH and not da.prefetches(2048, 8) and not da.prefetches(300, 2)


@pytest.mark.parametrize("shape", [(1, 32, 32, 81, 128, "bfloat16", 128, True, False, 2),
                                   (16, 8, 2, 300, 64, "float16", 32, False, True, 3)])
def test_kernel_lowers_for_cuda_from_partial_slots(shape):
    text = _lowered(*shape)
    assert text.count("custom_call @mosaic_gpu") == 1
    assert "tensor<%dx" % shape[-1] in text  # the slots go to the kernel as they are: no XLA sum before it
    assert "stablehlo.reduce" not in text and "dynamic_update_slice" not in text


def test_argument_errors(rng):
    (q, k, v), ck, cv, valid, pos, inv, offsets = _case(rng, 1, 4, 2, 16, 32, "bfloat16", 32, True, False)
    kw = dict(num_heads=4, offsets=offsets)
    with pytest.raises(ValueError, match="not a multiple of 2 kv heads"):
        da.decode_attention(q, k, v, ck, cv, 0, None, pos, inv, num_heads=3, offsets=offsets)
    with pytest.raises(ValueError, match="holding 4 heads of 32 features from offset"):
        da.decode_attention(q[:, :100], k, v, ck, cv, 0, None, pos, inv, **kw)
    with pytest.raises(ValueError, match="caches"):
        da.decode_attention(q, k, v, ck, cv[:, :8], 0, None, pos, inv, **kw)
    with pytest.raises(ValueError, match="dtypes .* differ"):
        da.decode_attention(q, k, v.astype(jnp.float16), ck, cv, 0, None, pos, inv, **kw)
    with pytest.raises(ValueError, match="RoPE needs positions"):
        da.decode_attention(q, k, v, ck, cv, 0, None, None, inv, **kw)
    with pytest.raises(ValueError, match="key_valid"):
        da.decode_attention(q, k, v, ck, cv, 0, jnp.ones((1, 5), bool), pos, inv, **kw)
    slots = _slotted(rng, q.astype(jnp.float32), 2, 8)
    with pytest.raises(ValueError, match="k .* must be float32 partial slots"):
        da.decode_attention(slots, k, v, ck, cv, 0, None, pos, inv, **kw)  # one kind of source for all three
    with pytest.raises(ValueError, match="must be float32 partial slots"):
        da.decode_attention(*(slots.astype(jnp.bfloat16),) * 3, ck, cv, 0, None, pos, inv, **kw)
    with pytest.raises(ValueError, match=r"M >= B=2"):
        ck2, cv2 = (jnp.concatenate([c, c]) for c in (ck, cv))
        da.decode_attention(*(slots[:, :, :1],) * 3, ck2, cv2, 0, None, jnp.concatenate([pos, pos]), inv, **kw)
    with pytest.raises(ValueError, match="parts=9"):
        da.decode_attention(q, k, v, ck, cv, 0, None, pos, inv, **kw, parts=9)
    assert "head_dim 24" in da.fits(4, 2, 16, 24, jnp.bfloat16, jnp.bfloat16)
    assert "float32" in da.fits(4, 2, 16, 32, jnp.float32, jnp.float32)
    assert "shared memory" in da.fits(64, 1, 100_000, 128, jnp.bfloat16, jnp.bfloat16)
    assert da.fits(32, 32, 81, 128, jnp.bfloat16, jnp.bfloat16, 128) is None


# ------------------------------------------------------------------------------------------------ model dispatch
def test_cluster_parts():
    # one CTA per head where the heads fill the GPU or the cache is one chunk; else up to 8 per head (a cluster)
    assert da.cluster_parts(1, 32, 81) == 1 and da.cluster_parts(16, 32, 4096) == 1
    assert da.cluster_parts(1, 32, 2048) == 8 and da.cluster_parts(1, 32, 300) == 3
    assert da.cluster_parts(2, 8, 4096) == 8 and da.cluster_parts(4, 32, 4096) == 3


def test_decode_kernel_rule(monkeypatch):
    q = jnp.zeros((1, 1, 32, 128), jnp.bfloat16)
    cache = {"k": jnp.zeros((1, 81, 32, 128), jnp.bfloat16)}
    assert not mc.decode_kernel_ok(q, cache, 128)  # CPU
    monkeypatch.setattr(mc.jax, "default_backend", lambda: "gpu")
    assert mc.decode_kernel_ok(q, cache, 128)
    assert not mc.decode_kernel_ok(jnp.zeros((1, 2, 32, 128), jnp.bfloat16), cache)  # prefill
    assert not mc.decode_kernel_ok(q, None)
    assert not mc.decode_kernel_ok(q.astype(jnp.float32), cache)
    with mc.xla_decode_attention():
        assert not mc.decode_kernel_ok(q, cache)
    assert mc.decode_kernel_ok(q, cache)
    with nn.intercept_methods(lambda f, args, kwargs, ctx: f(*args, **kwargs)):
        assert not mc.decode_kernel_ok(q, cache)  # an attention_activation hook must see the activations
    assert mc.decode_kernel_ok(q, {"k": jnp.zeros((1, 4096, 32, 128), jnp.bfloat16)})
    assert not mc.decode_kernel_ok(q, {"k": jnp.zeros((1, 100_000, 32, 128), jnp.bfloat16)})  # shared memory


def _decode_logits(module, params, prompt, token):
    cfg = module.config
    b, t = prompt.shape
    cache = mc.init_cache(cfg.num_layers, b, t + 3, *cfg.kv_cache_shape, jnp.float32)
    kv_mask = jnp.ones((b, t + 3), bool).at[0, 1].set(False)  # a padding key in row 0
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    _, cache = module.apply({"params": params}, prompt, pos, cache=cache, cache_index=0, kv_mask=kv_mask)
    logits, new = module.apply({"params": params}, token, jnp.full((b, 1), t), cache=cache, cache_index=t,
                               kv_mask=kv_mask)
    return np.asarray(logits[:, -1]), new


@functools.partial(jax.tree_util.register_dataclass, data_fields=["kernel"], meta_fields=["seed"])
@dataclasses.dataclass(frozen=True)
class _SlottedDense:
    """A dense kernel [K, N] whose matmul can leave 3 float32 partial slots (a random split of x @ W), as the
    quantized kernels' stream-K launches do: stands in for them on the CPU."""

    kernel: jax.Array
    seed: int
    takes_partial_sums = True

    def matmul(self, x, partial_sums=False):
        """``partial_sums``: True / "nm" -> slots [3, N + 64, 8]; "mn" -> [3, M, N] (the ws kernel's "mn" store)."""
        y = jnp.matmul(x, self.kernel.astype(x.dtype), preferred_element_type=jnp.float32)
        if not partial_sums:
            return y.astype(x.dtype)
        m, n = math.prod(x.shape[:-1]), self.kernel.shape[1]
        if partial_sums == "mn":
            noise = jax.random.normal(jax.random.key(self.seed), (2, m, n), jnp.float32)
            slots = jnp.concatenate([noise, (y.reshape(m, n) - noise.sum(0))[None]])
            return PartialSums(slots, m, n, jnp.dtype(x.dtype).name, "mn")
        noise = jax.random.normal(jax.random.key(self.seed), (2, n + 64, 8), jnp.float32)
        last = jnp.zeros((n + 64, 8), jnp.float32).at[:n, :m].set(y.reshape(m, n).T) - noise.sum(0)
        return PartialSums(jnp.concatenate([noise, last[None]]), m, n, jnp.dtype(x.dtype).name)


@pytest.mark.parametrize("family,fuse", [("llama", False), ("llama", True), ("llama", "slots"), ("opt", False),
                                         ("falcon", False)])
def test_decode_step_through_the_kernel_wiring_matches_xla(tiny_hf, rng, monkeypatch, family, fuse):
    lm = tiny_hf(family).loaded
    params = lm.params
    if fuse:
        from jaxquant.fusion import fuse_projections

        params, report = fuse_projections(params, "llama")
        assert report["fused"]
    if fuse == "slots":  # the fused q/k/v projection leaves partial slots, which the kernel reads
        params = jax.tree_util.tree_map_with_path(
            lambda path, a: _SlottedDense(a, int(rng.integers(1 << 30))) if "qkv_proj" in jax.tree_util.keystr(path)
            and a.ndim == 2 else a, params)
    prompt = jnp.asarray(rng.integers(0, 128, (2, 5)), jnp.int32)
    token = jnp.asarray(rng.integers(0, 128, (2, 1)), jnp.int32)
    want, want_cache = _decode_logits(lm.module, params, prompt, token)
    calls = []

    def kernel(*args, **kwargs):
        calls.append((kwargs["offsets"], args[0].ndim))
        return da.reference_decode_attention(*args, **kwargs)

    monkeypatch.setattr(mc, "decode_kernel_ok", lambda q, cache, rope_dims=0: cache is not None and q.shape[1] == 1)
    monkeypatch.setattr(da, "decode_attention", kernel)
    got, got_cache = _decode_logits(lm.module, params, prompt, token)
    assert len(calls) == lm.module.config.num_layers
    if fuse:
        assert all(o[1] > 0 for o, _ in calls)  # read from the fused projection's output
    assert all(ndim == (3 if fuse == "slots" else 2) for _, ndim in calls)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    for a, c in zip(jax.tree_util.tree_leaves(got_cache), jax.tree_util.tree_leaves(want_cache)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-5, atol=1e-6)
