"""SiLU(gate) * up computed while the down projection's ws kernel stages its activations (CPU):
``gptq_matmul.SwiGLUSlots``, the "mn" slot layout, the staging plan (``staged_swiglu_reference``, built through the
kernel's own coordinates) against a float64 oracle, the dispatch rules, the CUDA lowering of both kernels, and the
LLaMA decode wiring (the fused gate/up projection's slots reach the down projection's kernel)."""
import dataclasses
import functools

import ml_dtypes
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from pallas_kernels import gptq_matmul as gm
from pallas_kernels import lut_matmul as lm
from tests.test_decode_attention import _decode_logits, _SlottedDense
from tests.test_kernels import random_gptq
from tests.test_kernels_lut import random_lut

BF16_ULP = 2.0**-7


def _slots(rng, p, rows, inter):
    return (2.0 * rng.standard_normal((p, rows, 2 * inter))).astype(np.float32)


def _bf16(a):
    return np.asarray(a, np.float64).astype(ml_dtypes.bfloat16).astype(np.float64)


def _oracle(slots, m, inter):
    """float64: the slots summed, gate and up rounded to bf16 (as the projection's output is), SiLU(g) * u."""
    total = np.asarray(slots, np.float64).sum(0)[:m]
    g, u = _bf16(total[:, :inter]), _bf16(total[:, inter:2 * inter])
    return g / (1.0 + np.exp(-g)) * u


@pytest.mark.parametrize("m,tile_k,inter,k_pad", [(1, 256, 512, 512), (3, 128, 320, 512), (7, 64, 192, 256)])
def test_staging_plan_matches_float64_oracle(rng, m, tile_k, inter, k_pad):
    """Every staged element is SiLU(gate) * up of its column (the plan leaves no hole: the tile is NaN-poisoned),
    rows m..7 and the columns past inter (where K_pad > I the kernel's TMA boxes are zero-filled) are 0."""
    slots = _slots(rng, 3, m, inter)
    tiles = np.asarray(gm.staged_swiglu_reference(jnp.asarray(slots), m, inter, k_pad, tile_k, jnp.bfloat16),
                       np.float64)
    assert tiles.shape == (8, k_pad) and np.isfinite(tiles).all()
    assert not tiles[m:].any() and not tiles[:, inter:].any()
    want = _oracle(slots, m, inter)
    np.testing.assert_allclose(tiles[:m, :inter], want, rtol=4 * BF16_ULP, atol=1e-6)
    swapped = _oracle(np.concatenate([slots[..., inter:], slots[..., :inter]], -1), m, inter)
    assert np.max(np.abs(tiles[:m, :inter] - swapped)) > 0.1 * np.max(np.abs(want))


def test_swiglu_rounded_matches_xla(rng):
    """The staging's arithmetic (``swiglu_rounded``) is XLA's bf16 SiLU(g) * u to within one bf16 ulp (bitwise on
    the H100: bench/results/swiglu_staging.md), and ``SwiGLUSlots.value`` is the models' XLA expression."""
    g = jnp.asarray(4.0 * rng.standard_normal(2048), jnp.bfloat16)
    u = jnp.asarray(4.0 * rng.standard_normal(2048), jnp.bfloat16)
    got = np.asarray(gm.swiglu_rounded(g, u), np.float64)
    want = np.asarray(jax.jit(lambda g, u: jax.nn.silu(g) * u)(g, u), np.float64)
    assert np.max(np.abs(got - want) / np.maximum(np.abs(want), 1e-30)) <= BF16_ULP
    slots = _slots(rng, 2, 3, 64)
    sg = gm.SwiGLUSlots(gm.PartialSums(jnp.asarray(slots), 3, 128, "bfloat16", "mn"), 64, (3, 1))
    assert sg.shape == (3, 1, 64) and sg.dtype == jnp.bfloat16
    total = jnp.asarray(slots.sum(0)).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(sg.value(), np.float32),
                                  np.asarray(jax.nn.silu(total[:, :64]) * total[:, 64:], np.float32)[:, None])


def test_mn_partial_sums_and_layout_argument(rng):
    p = rng.standard_normal((3, 5, 448)).astype(np.float32)
    got = np.asarray(gm.PartialSums(jnp.asarray(p), 5, 400, "bfloat16", "mn").value(), np.float64)
    np.testing.assert_allclose(got, _bf16(p.astype(np.float64).sum(0)[:, :400]), rtol=BF16_ULP)
    as_nm = gm.PartialSums(jnp.asarray(p.transpose(0, 2, 1)), 5, 400, "bfloat16").value()
    np.testing.assert_array_equal(np.asarray(as_nm, np.float32), np.asarray(got, np.float32))
    assert [gm.slot_layout(v) for v in (False, None, True, "nm", "mn")] == [None, None, "nm", "nm", "mn"]
    with pytest.raises(ValueError, match="partial_sums"):
        gm.slot_layout("km")


def _weights(rng, fmt, K, I, N):
    """(gate/up [K, 2I], down [I, N]) kernel weights of ``fmt`` ("gptq4", "gptq3", "lut4", "lut3")."""
    bits = int(fmt[-1])
    out = []
    for k, n in ((K, 2 * I), (I, N)):
        if fmt.startswith("gptq"):
            out.append(gm.pack(*random_gptq(rng, k, n, bits, 128, False, False), bits=bits, sym=False))
        else:
            codes, lut, _ = random_lut(rng, k, n, bits)
            out.append(lm.pack(codes, lut, bits=bits))
    return out


WS = gm.KernelConfig(variant="ws", tile_k=256)


@pytest.mark.parametrize("fmt", ["gptq4", "gptq3", "lut4", "lut3"])
def test_kernels_lower_for_cuda(rng, fmt, monkeypatch):
    """The gate/up kernel storing "mn" slots [P, M, N_pad] and the down kernel staging SiLU * up from them trace
    and lower for CUDA on the CPU (I = 384: down's K_pad 512 > I, its last block past the slots); with the staging
    the program has no XLA SiLU, and with JAXQUANT_SWIGLU_STAGING off it has."""
    K, I, N = 512, 384, 256
    w_gu, w_dn = _weights(rng, fmt, K, I, N)
    call = gm.gptq_matmul if fmt.startswith("gptq") else lm.lut_matmul
    x = jnp.asarray(rng.standard_normal((1, K)), jnp.bfloat16)
    scale = jnp.asarray(rng.uniform(0.5, 1.5, K), jnp.bfloat16)

    def gate_up(x):
        return call(x, w_gu, config=WS, rms_norm=(scale, 1e-5), partial_sums="mn")

    sums = jax.eval_shape(gate_up, x)
    slots = WS.resolved(w_gu, 1).k_splits
    assert isinstance(sums, gm.PartialSums) and sums.layout == "mn" and sums.partials.shape == (slots, 1, 2 * I)
    text = jax.jit(gate_up).trace(x).lower(lowering_platforms=("cuda",)).as_text()
    assert "x2_rmsnorm_mn" in text

    assert w_dn.k_pad > I
    g = gm.SwiGLUSlots(gm.PartialSums(jnp.asarray(_slots(rng, slots, 1, I)), 1, 2 * I, "bfloat16", "mn"), I, (1, 1))
    assert gm.swiglu_staging_ok(WS.resolved(w_dn, 1), w_dn, g)

    def down(partials):
        sg = gm.SwiGLUSlots(gm.PartialSums(partials, 1, 2 * I, "bfloat16", "mn"), I, (1, 1))
        return w_dn.matmul(sg, use_kernel=True, config=WS)

    assert jax.eval_shape(down, g.sums.partials).shape == (1, 1, N)
    staged = jax.jit(down).trace(g.sums.partials).lower(lowering_platforms=("cuda",)).as_text()
    kernel = f"x{WS.resolved(w_dn, 1).wgs}_swiglu"  # the kernel name's suffix (``ws_name_suffix``)
    assert kernel in staged and "stablehlo.exponential" not in staged
    monkeypatch.setattr(gm, "SWIGLU_STAGING_DEFAULT", False)
    plain = jax.jit(lambda p: down(p)).trace(g.sums.partials).lower(lowering_platforms=("cuda",)).as_text()
    assert kernel not in plain and "stablehlo.exponential" in plain


def test_staging_rules_and_fallbacks(rng, monkeypatch):
    """``swiglu_staging_ok`` names the kernel path's conditions; off it the weight computes the XLA value first
    (on the CPU: the reference product of SiLU(gate) * up)."""
    K, I, N = 512, 384, 256
    w_gu, w_dn = _weights(rng, "gptq4", K, I, N)
    cfg = WS.resolved(w_dn, 1)
    partials = jnp.asarray(_slots(rng, 2, 1, I))

    def slots(p=partials, rows=1, inter=I, layout="mn", dtype="bfloat16"):
        return gm.SwiGLUSlots(gm.PartialSums(p, rows, p.shape[2], dtype, layout), inter, (rows,))

    assert gm.swiglu_staging_ok(cfg, w_dn, slots())
    wide = jnp.asarray(_slots(rng, 2, 1, I + 32))
    for bad in (slots(layout="nm"), slots(p=jnp.asarray(_slots(rng, 2, 8, I)), rows=8), slots(p=wide),
                slots(dtype="float16")):
        assert not gm.swiglu_staging_ok(cfg, w_dn, bad)
    assert not gm.swiglu_staging_ok(gm.KernelConfig().resolved(w_dn, 1), w_dn, slots())  # one-warpgroup kernel
    codes, scales, zeros, g_idx = random_gptq(rng, I, N, 4, 128, False, True)
    act_order = gm.pack(codes, scales, zeros, g_idx, bits=4, sym=False)
    assert act_order.perm is not None and not gm.swiglu_staging_ok(WS.resolved(act_order, 1), act_order, slots())
    codes, lut, sparse = random_lut(rng, I, N, 4, nnz_frac=0.01)
    sparse_lut = lm.pack(codes, lut, bits=4, sparse=sparse)
    assert not gm.swiglu_staging_ok(WS.resolved(sparse_lut, 1), sparse_lut, slots())
    lut3 = lm.pack(*random_lut(rng, I, N, 3)[:2], bits=3)
    # the models hand LUT weights the slots (measured faster), not GPTQ ones; JAXQUANT_SWIGLU_STAGING=0 neither
    assert lut3.takes_swiglu_slots and not w_dn.takes_swiglu_slots
    monkeypatch.setattr(gm, "SWIGLU_STAGING_DEFAULT", False)
    assert not lut3.takes_swiglu_slots and not gm.swiglu_staging_ok(cfg, w_dn, slots())
    monkeypatch.setattr(gm, "SWIGLU_STAGING_DEFAULT", True)
    g = slots()
    for w in (w_dn, lut3):
        np.testing.assert_array_equal(np.asarray(w.matmul(g), np.float32), np.asarray(w.matmul(g.value()), np.float32))


@functools.partial(jax.tree_util.register_dataclass, data_fields=["kernel"], meta_fields=["takes_swiglu_slots"])
@dataclasses.dataclass(frozen=True)
class _StagingDense:
    """A dense down projection [I, N] that takes a SwiGLUSlots as the ws kernels do (``takes_swiglu_slots``):
    through the staging's own plan (``staged_swiglu_reference``) -> the staged rows @ W. Counts the calls that came
    with slots."""

    kernel: jax.Array
    takes_swiglu_slots: bool = True
    staged_calls = [0]

    def matmul(self, x):
        if not isinstance(x, gm.SwiGLUSlots):
            return jnp.matmul(x, self.kernel.astype(x.dtype))
        _StagingDense.staged_calls[0] += 1
        m, inter = x.sums.rows, x.inter
        tiles = gm.staged_swiglu_reference(x.sums.partials, m, inter, inter, 64, x.dtype)
        return jnp.matmul(tiles[:m].astype(x.dtype), self.kernel.astype(x.dtype)).reshape(*x.lead, -1)


def test_llama_decode_hands_gate_up_slots_to_the_down_kernel(tiny_hf, rng):
    """LLaMA with a fused gate/up projection whose kernel leaves 3 random "mn" slots and a down projection that
    stages SiLU * up from them: at the decode step (2 rows) down receives the slots (once per layer), at the prefill
    (10 rows) the summed value; the logits and caches equal the XLA path's. A down kernel that does not take slots
    keeps the projection's summed output."""
    from jaxquant.fusion import fuse_projections

    lm_ = tiny_hf("llama").loaded
    params, report = fuse_projections(lm_.params, "llama")
    assert any("gate_up" in f for f in report["fused"])
    prompt = jnp.asarray(rng.integers(0, 128, (2, 5)), jnp.int32)
    token = jnp.asarray(rng.integers(0, 128, (2, 1)), jnp.int32)
    want, want_cache = _decode_logits(lm_.module, params, prompt, token)

    def swap(path, a):
        name = jax.tree_util.keystr(path)
        if "gate_up_proj" in name and a.ndim == 2:
            return _SlottedDense(a, int(rng.integers(1 << 30)))
        return _StagingDense(a) if "down_proj" in name and a.ndim == 2 else a

    staged = jax.tree_util.tree_map_with_path(swap, params)
    _StagingDense.staged_calls[0] = 0
    got, got_cache = _decode_logits(lm_.module, staged, prompt, token)
    assert _StagingDense.staged_calls[0] == lm_.module.config.num_layers  # the decode step only
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    for a, c in zip(jax.tree_util.tree_leaves(got_cache), jax.tree_util.tree_leaves(want_cache)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-5, atol=1e-6)

    not_taking = jax.tree_util.tree_map(lambda k: _StagingDense(k.kernel, False) if isinstance(k, _StagingDense)
                                        else k, staged, is_leaf=lambda k: isinstance(k, _StagingDense))
    _StagingDense.staged_calls[0] = 0
    off, _ = _decode_logits(lm_.module, not_taking, prompt, token)
    assert _StagingDense.staged_calls[0] == 0
    np.testing.assert_allclose(off, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
