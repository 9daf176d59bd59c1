"""The RMSNorm fused into the ws kernel's activation staging (``gptq_matmul.kernel_norm``, ``build_ws_kernel``'s
``norm``) and the model seam that feeds it (``models.common.NormedInput``).

The kernel runs on the GPU only (``bench/norm_fused.py`` checks it there against the float32 oracle, into NaN-poisoned
outputs). Here: the reference it is checked against (vs a float64 numpy oracle of HF LLaMA's RMSNorm), the rule that
decides where it runs, that the fused builders lower for CUDA, and that a model hands NormedInputs to exactly the
linears whose kernels take them, with the same logits as before.
"""
from __future__ import annotations

import importlib.util
import os

import flax.linen as nn
import ml_dtypes
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from models.common import NormedInput, as_array, rms_norm
from pallas_kernels import gptq_matmul as gm
from pallas_kernels import lut_matmul as lm
from test_kernels import random_gptq
from test_kernels_lut import random_lut

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "decode.py")
_spec = importlib.util.spec_from_file_location("bench_decode_norm", _PATH)
decode = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(decode)

BF16 = ml_dtypes.bfloat16


def numpy_rms_norm(x, scale, eps):
    """float64 oracle of HF LLaMA's RMSNorm in bf16: r = 1 / sqrt(mean(x^2) + eps), then bf16(bf16(x * r) * scale)
    (float32 arithmetic rounds the products the same way whenever the float64 result is not a tie)."""
    x64 = np.asarray(x, np.float64)
    r = 1.0 / np.sqrt(np.mean(x64 * x64, axis=-1, keepdims=True) + eps)
    xr = (x64 * r).astype(np.float32).astype(BF16).astype(np.float64)
    return (xr * np.asarray(scale, np.float64)).astype(np.float32).astype(BF16).astype(np.float64)


def bf16_ulps(a, b):
    """|a - b| in units of bf16 spacing at b (elementwise, float64 inputs holding bf16 values)."""
    spacing = np.maximum(np.abs(b), 2.0**-126) * 2.0**-7
    return np.abs(a - b) / spacing


@pytest.mark.parametrize("K", [576, 1000, 4096])
def test_rms_norm_rows_matches_float64_oracle_and_the_model(rng, K):
    """The kernels' reference norm (what the GPU fused kernel must reproduce) is HF LLaMA's RMSNorm: at most one bf16
    rounding step from the float64 oracle (float32 mean / rsqrt), and bitwise the model's own RMSNorm."""
    x = jnp.asarray(rng.standard_normal((5, K)) * rng.uniform(0.1, 20), jnp.bfloat16)
    scale = jnp.asarray(1 + 0.5 * rng.standard_normal(K), jnp.bfloat16)
    got = np.asarray(gm.rms_norm_rows(x, scale, 1e-5), np.float64)
    want = numpy_rms_norm(np.asarray(x, np.float32), np.asarray(scale, np.float32), 1e-5)
    ulps = bf16_ulps(got, want)
    assert ulps.max() <= 1.0 and (ulps > 0).mean() < 0.01, (ulps.max(), (ulps > 0).mean())
    np.testing.assert_array_equal(got, np.asarray(rms_norm(x, scale, 1e-5), np.float64))


def _gptq(rng, K, N, bits=4, act=False):
    return gm.pack(*random_gptq(rng, K, N, bits, 128, False, act), bits=bits, sym=False)


def test_fused_norm_rule(rng):
    """Where the kernel applies the norm: the ws kernel on the unpadded x at M <= FUSED_NORM_MAX_M, weights in input
    order, no sparse part; everywhere else ``kernel_norm`` applies it in XLA and hands the kernel no norm."""
    w = _gptq(rng, 1024, 512)
    ws = gm.KernelConfig(variant="ws", tile_k=256)
    assert gm.FUSED_NORM_MAX_M == 1
    assert gm.fused_norm_ok(ws.resolved(w, 1), w, 1)
    assert not gm.fused_norm_ok(ws.resolved(w, 2), w, 2)  # measured slower at M = 2 and 4 (NOTES)
    assert not gm.fused_norm_ok(gm.KernelConfig(variant="ws", tile_k=256, direct_x=False).resolved(w, 1), w, 1)
    assert not gm.fused_norm_ok(gm.KernelConfig(tile_k=256, k_splits=1).resolved(w, 1), w, 1)  # one warpgroup
    w_act = _gptq(rng, 1024, 512, act=True)
    assert w_act.perm is not None and not gm.fused_norm_ok(ws.resolved(w_act, 1), w_act, 1)
    codes, lut, sparse = random_lut(rng, 1024, 512, 4, nnz_frac=0.01)
    w_sparse = lm.pack(codes, lut, bits=4, sparse=sparse)
    assert w_sparse.nnz and not gm.fused_norm_ok(ws.resolved(w_sparse, 1), w_sparse, 1)

    x = jnp.asarray(rng.standard_normal((1, 1024)), jnp.bfloat16)
    scale = jnp.asarray(rng.uniform(0.5, 1.5, 1024), jnp.bfloat16)
    x_out, norm = gm.kernel_norm(x, w, ws.resolved(w, 1), 1, (scale, 1e-6))
    assert x_out is x and norm[1:] == (1024, 1e-6) and norm[0].shape == (16, 64)
    np.testing.assert_array_equal(np.asarray(norm[0]).ravel(), np.asarray(scale))
    x_out, norm = gm.kernel_norm(x, w_act, ws.resolved(w_act, 1), 1, (scale, 1e-6))
    assert norm is None
    np.testing.assert_array_equal(np.asarray(x_out), np.asarray(gm.rms_norm_rows(x, scale, 1e-6)))
    with pytest.raises(ValueError, match=r"RMSNorm scale must be \[1024\]"):
        gm.kernel_norm(x, w, ws.resolved(w, 1), 1, (scale[:1000], 1e-6))


def test_fused_norm_scale_is_zero_padded_past_k(rng):
    """K not a multiple of 64: the kernel's scale blocks are the scale padded with zeros to K_x (the padded x columns
    normalise to 0 whatever their rms), and the mean divides by the real K."""
    w = _gptq(rng, 1000, 256)
    x = jnp.asarray(rng.standard_normal((1, 1000)), jnp.bfloat16)
    scale = jnp.asarray(rng.uniform(0.5, 1.5, 1000), jnp.bfloat16)
    _, norm = gm.kernel_norm(x, w, gm.KernelConfig(variant="ws", tile_k=256).resolved(w, 1), 1, (scale, 1e-5))
    assert norm[1] == 1000
    flat = np.asarray(norm[0], np.float32).ravel()
    np.testing.assert_array_equal(flat[:1000], np.asarray(scale, np.float32))
    assert flat.size == w.k_pad and not flat[1000:].any()


@pytest.mark.parametrize("fmt,K,M", [("gptq4", 1024, 1), ("gptq3", 1000, 1), ("lut4", 1024, 1), ("lut3", 1088, 1)])
def test_fused_norm_kernels_lower_for_cuda(rng, fmt, K, M):
    """The fused builders (GPTQ and LUT ws kernels with ``norm``) trace and lower for CUDA on the CPU; the lowered
    program has no XLA rsqrt (the norm is inside the kernel), while the unfused call has one."""
    N = 512
    if fmt.startswith("gptq"):
        w, call = _gptq(rng, K, N, bits=int(fmt[-1])), gm.gptq_matmul
    else:
        codes, lut, _ = random_lut(rng, K, N, int(fmt[-1]))
        w, call = lm.pack(codes, lut, bits=int(fmt[-1])), lm.lut_matmul
    config = gm.KernelConfig(variant="ws", tile_k=256)
    assert gm.fused_norm_ok(config.resolved(w, M), w, M)
    x = jnp.asarray(rng.standard_normal((M, K)), jnp.bfloat16)
    scale = jnp.asarray(rng.uniform(0.5, 1.5, K), jnp.bfloat16)

    def lowered(rms_norm):
        return jax.jit(lambda x, w, s: call(x, w, config=config, rms_norm=(s, 1e-5) if rms_norm else None)).trace(
            x, w, scale).lower(lowering_platforms=("cuda",)).as_text()

    fused, plain = lowered(True), lowered(False)
    assert "_rmsnorm" in fused and "stablehlo.rsqrt" not in fused
    assert "_rmsnorm" not in plain


def test_reference_paths_apply_the_norm(rng):
    """Off the kernel path (CPU, or M > 64) ``matmul(rms_norm=...)`` is the reference product of the normalised x."""
    w = _gptq(rng, 512, 256)
    codes, lut, sparse = random_lut(rng, 512, 256, 3, nnz_frac=0.01)
    w_lut = lm.pack(codes, lut, bits=3, sparse=sparse)
    scale = jnp.asarray(rng.uniform(0.5, 1.5, 512), jnp.bfloat16)
    for weight in (w, w_lut):
        for m in (3, 70):
            x = jnp.asarray(rng.standard_normal((m, 512)) * 4, jnp.bfloat16)
            got = weight.matmul(x, use_kernel=False, rms_norm=(scale, 1e-5))
            want = weight.matmul(gm.rms_norm_rows(x, scale, 1e-5), use_kernel=False)
            np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_model_hands_normed_inputs_to_fusing_linears_only(rng):
    """A LLaMA whose q/k/v and gate/up are fused GPTQ kernel weights passes those two linears NormedInputs (every other
    linear, the lm_head included, gets arrays); the logits are bitwise those with the norms applied in XLA
    (JAXQUANT_FUSED_NORM=0); dense weights never see a NormedInput."""
    dims = dict(vocab_size=128, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=2, num_kv_heads=2,
                head_dim=64)
    key = jax.random.PRNGKey(int(rng.integers(2**31)))
    ids = jnp.asarray(rng.integers(0, 128, (2, 7)), jnp.int32)

    def run(spec, fused):
        module, params = decode.build_model(spec, key, dims=dims)[:2]
        seen = {}

        def spy(next_fun, args, kwargs, context):
            if context.method_name == "__call__" and hasattr(context.module, "features"):
                seen["/".join(context.module.path[1:])] = isinstance(args[0], NormedInput)
            return next_fun(*args, **kwargs)

        old, gm.FUSED_NORM_DEFAULT = gm.FUSED_NORM_DEFAULT, fused
        try:
            with nn.intercept_methods(spy):
                logits = module.apply({"params": params}, ids)[0]
        finally:
            gm.FUSED_NORM_DEFAULT = old
        return np.asarray(logits), seen

    fused_logits, seen = run("gptq-w4g128+fused", True)
    assert {k for k, v in seen.items() if v} == {"self_attn/qkv_proj", "mlp/gate_up_proj"}, seen
    plain_logits, seen = run("gptq-w4g128+fused", False)
    assert not any(seen.values())
    np.testing.assert_array_equal(fused_logits, plain_logits)
    assert np.isfinite(fused_logits).all() and fused_logits.std() > 0
    _, seen = run("bf16", True)
    assert not any(seen.values())


def test_as_array_and_normed_input_shape(rng):
    x = jnp.asarray(rng.standard_normal((2, 3, 64)), jnp.bfloat16)
    scale = jnp.asarray(rng.uniform(0.5, 1.5, 64), jnp.bfloat16)
    n = NormedInput(x, scale, 1e-6)
    assert n.shape == x.shape and as_array(x) is x
    np.testing.assert_array_equal(np.asarray(as_array(n), np.float32), np.asarray(rms_norm(x, scale, 1e-6), np.float32))
