"""SpQR: the jitted algorithm against the float64 numpy oracle (tests/oracles_spqr.py), outliers lowering the
Hessian-weighted error, the stored format (exact reconstruction, an independent numpy dequantization, bits per
parameter counted by hand), the pipeline on LLaMA / OPT / Falcon with an orbax round trip, the CLI, and bad input.

Inputs are drawn fresh each run from the ``rng`` fixture, which prints its seed."""
from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import oracles_spqr
from jaxquant.formats_spqr import SpQRWeight, spqr_average_bits
from jaxquant.packing import unpack
from jaxquant.sparse import csr_from_mask
from jaxquant.spqr import SpQRConfig, spqr

N, K, T = 64, 256, 1024
DEAD = (5, 77)
INF = float("inf")


def problem(rng, n=N, k=K, dead=DEAD):
    """Heavy-tailed weights (Student t, 4 degrees of freedom: a few large ones per group, the case outliers are for)
    with uneven column scales, and H = 2/T X^T X from correlated low-rank activations with dead inputs."""
    W = rng.standard_t(4, (n, k)) * (0.5 + rng.random(k))
    rank = k // 4
    X = rng.standard_normal((T, rank)) @ rng.standard_normal((rank, k)) / np.sqrt(rank)
    X = (X + 0.3 * rng.standard_normal((T, k))) * (0.5 + rng.random(k))
    X[:, list(dead)] = 0.0
    return W.astype(np.float32), (2.0 / T * X.T @ X).astype(np.float32)


def hessian_error(W, deq, H):
    """tr((W - Q) H (W - Q)^T) in float64: the layer's output error on the calibration inputs (up to scale)."""
    D = np.asarray(W, np.float64) - np.asarray(deq, np.float64)
    return float(np.einsum("nk,kl,nl->", D, np.asarray(H, np.float64), D))


def stored_statistics(weight: SpQRWeight) -> dict:
    return dict(scale_codes=np.asarray(unpack(weight.scale_codes, bits=weight.qq_scale_bits, axis=1)),
                zero_codes=np.asarray(unpack(weight.zero_codes, bits=weight.qq_zero_bits, axis=1)),
                scale_qq=np.asarray(weight.scale_qq), zero_qq=np.asarray(weight.zero_qq))


def run_oracle(W, H, cfg, follow=None):
    return oracles_spqr.spqr(W, H, cfg.bits, cfg.group_size, cfg.qq_scale_bits, cfg.qq_zero_bits, cfg.qq_groupsize,
                             cfg.outlier_relative_threshold, cfg.simplified_outliers, cfg.act_order, cfg.round_zero,
                             cfg.percdamp, follow=follow)


README3 = dict(bits=3)  # the README recipe at 3 bits: g16, 3/3-bit statistics in groups of 16, tau 0.2, act-order, 1.0
CASES = [
    README3,
    dict(bits=4, simplified_outliers=True, act_order=False, block_size=40, percdamp=0.01, round_zero=True),
    dict(bits=2, group_size=32, qq_scale_bits=4, qq_zero_bits=2, qq_groupsize=32, outlier_relative_threshold=0.5),
]  # (block_size=40 runs as blocks of 32; no outliers at all is checked against the oracle in the next test)


@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_spqr_matches_oracle(case, rng):
    """Codes, outliers, leave-one-out candidates and second-level codes agree with the float64 oracle on >= 99.9% of
    entries, and the loss within 1e-4 relative. Exact agreement is not asserted: where a value sits within float32
    noise of a boundary (a rounding tie, err^2 ~ tau, a float16 rounding midpoint) the two may decide differently,
    and in an error-feedback algorithm one such decision steers the rest of its row. So the oracle takes this
    implementation's side at such near-boundary points only, and each is counted as a disagreement."""
    cfg = SpQRConfig(**case)
    W, H = problem(rng)
    weight, err, det = spqr(W, H, cfg, return_details=True)
    codes = np.asarray(weight.codes()).T
    stats = stored_statistics(weight)
    outliers, loo = np.asarray(det.outliers), np.asarray(det.loo_candidates)
    ref = run_oracle(W, H, cfg, follow=dict(codes=codes, outliers=outliers, loo=loo, deq=np.asarray(det.dequantized),
                                            **stats))

    # Every near-boundary event the oracle followed counts as a disagreement of the codes; the other arrays must
    # agree on 99.9% of their entries after it followed them.
    agree = (np.sum(codes == ref.codes) - ref.forced) / codes.size
    assert agree >= 0.999, f"codes agree on {agree:.5f} ({ref.forced} near-boundary events followed)"
    for name in ("scale_codes", "zero_codes"):
        assert np.mean(stats[name] == getattr(ref, name)) >= 0.999, name
    assert np.mean(outliers == ref.outliers) >= 0.999 and np.mean(loo == ref.loo) >= 0.999
    assert abs(err - ref.loss) / ref.loss < 1e-4, (err, ref.loss)
    if cfg.outliers:
        assert abs(det.threshold - ref.threshold) <= 1e-5 * ref.threshold
        assert 0 < weight.nnz == outliers.sum() < 0.25 * W.size  # the outlier path is exercised
        if not cfg.simplified_outliers:
            assert loo.any()
    else:
        assert weight.nnz == 0 and not loo.any()
    assert np.mean(np.isclose(np.asarray(weight.statistics()[0]), ref.scale, rtol=1e-4)) >= 0.99

    # The stored format reproduces exactly the matrix the algorithm propagated errors against. Under jit XLA may
    # contract a multiply-add of the fused statistics (see SpQRWeight.dequantize): equal up to float32 rounding.
    deq = np.asarray(det.dequantized)
    np.testing.assert_array_equal(np.asarray(weight.dequantize()).T, deq)
    np.testing.assert_allclose(np.asarray(jax.jit(lambda w: w.dequantize())(weight)).T, deq, rtol=1e-5,
                               atol=1e-6 * np.abs(deq).max())
    # Outliers are the float16 values of the (error-updated) weights; everything else is on the group's grid.
    np.testing.assert_array_equal(np.asarray(weight.outlier_mask()), outliers)
    both = outliers & ref.outliers
    # float16 rounding (2e-3) of values carrying float32 noise from the error updates (1e-5 absolute for |W| ~ 1)
    np.testing.assert_allclose(deq[both], ref.deq[both], rtol=2e-3, atol=1e-5)
    assert weight.shape == (K, N) and weight.perm.shape == ((K,) if cfg.act_order else (0,))
    if cfg.act_order:
        np.testing.assert_array_equal(np.asarray(weight.perm), ref.perm)


def test_outliers_reduce_hessian_error(rng):
    """Same settings, same data: keeping outliers (full and simplified detection) strictly lowers
    tr((W - Q) H (W - Q)^T) against the same configuration without outliers."""
    W, H = problem(rng)
    base = SpQRConfig(bits=3)
    errors = {}
    for name, cfg in (("none", dataclasses.replace(base, outlier_relative_threshold=INF)), ("loo", base),
                      ("simplified", dataclasses.replace(base, simplified_outliers=True))):
        weight, loss, det = spqr(W, H, cfg, return_details=True)
        errors[name] = hessian_error(W, np.asarray(det.dequantized), H)
        assert (weight.nnz > 0) == (name != "none")
        if name == "none":  # the path without outliers against the oracle too
            codes = np.asarray(weight.codes()).T
            ref = run_oracle(W, H, cfg, follow=dict(codes=codes, **stored_statistics(weight)))
            assert (np.sum(codes == ref.codes) - ref.forced) / codes.size >= 0.999
            assert abs(loss - ref.loss) / ref.loss < 1e-4 and not ref.outliers.any()
    assert errors["loo"] < errors["none"] and errors["simplified"] < errors["none"], errors


def test_matmul_and_pytree(rng):
    W, H = problem(rng)
    weight, _, det = spqr(W, H, SpQRConfig(bits=3), return_details=True)
    x = rng.standard_normal((2, 3, K)).astype(np.float32)
    ref = x.astype(np.float64) @ np.asarray(det.dequantized, np.float64).T
    got = np.asarray(jax.jit(lambda w, x: w.matmul(x))(weight, x))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    leaves, tree = jax.tree_util.tree_flatten(weight)
    back = jax.tree_util.tree_unflatten(tree, leaves)
    assert back.group_size == 16 and back.nnz == weight.nnz and len(leaves) == 9


# ------------------------------------------------------------------------------------------------- stored format
def hand_built(rng, perm=True, nnz=5):
    """A 32 x 64 (out x in) SpQRWeight with random stored contents: 3-bit codes, groups of 16, 3/3-bit statistics in
    groups of 16 rows, ``nnz`` outliers, optionally an input permutation."""
    n, k, gs, qqg = 32, 64, 16, 16
    G = k // gs
    codes = rng.integers(0, 8, (n, k))
    scale_codes, zero_codes = rng.integers(0, 8, (G, n)), rng.integers(0, 8, (G, n))
    scale_qq = np.stack([rng.uniform(1e-3, 2e-3, (G, n // qqg)), rng.uniform(-3, -1, (G, n // qqg))], -1)
    zero_qq = np.stack([rng.uniform(0.1, 0.5, (G, n // qqg)), rng.uniform(-2, 0, (G, n // qqg))], -1)
    mask = np.zeros(n * k, bool)
    mask[rng.choice(n * k, nnz, replace=False)] = True
    dense = rng.standard_normal((n, k))
    order = rng.permutation(k) if perm else None
    weight = SpQRWeight.from_parts(codes, scale_codes, zero_codes, scale_qq.astype(np.float16),
                                   zero_qq.astype(np.float16), csr_from_mask(dense, mask.reshape(n, k)), order,
                                   bits=3, group_size=gs, qq_scale_bits=3, qq_zero_bits=3, qq_groupsize=qqg)
    return weight, dict(codes=codes, scale_codes=scale_codes, zero_codes=zero_codes, scale_qq=scale_qq,
                        zero_qq=zero_qq, mask=mask.reshape(n, k), dense=dense, perm=order)


def test_dequantize_matches_numpy_reading_of_the_layout(rng):
    weight, p = hand_built(rng)
    n, k = p["codes"].shape
    f16 = lambda a: np.asarray(a, np.float16).astype(np.float32)  # noqa: E731
    rows = np.arange(n) // 16
    group = np.empty(k, int)
    group[p["perm"]] = np.arange(k) // 16  # column perm[j] is in group j // 16
    s_qq, z_qq = f16(p["scale_qq"]), f16(p["zero_qq"])
    scale = s_qq[:, rows, 0] * (p["scale_codes"] - s_qq[:, rows, 1])  # [G, n]
    zero = z_qq[:, rows, 0] * (p["zero_codes"] - z_qq[:, rows, 1])
    want = (scale[group].T * (p["codes"] - zero[group].T)).astype(np.float32)  # [n, k]
    want[p["mask"]] = f16(p["dense"])[p["mask"]]
    np.testing.assert_allclose(np.asarray(weight.dequantize()).T, want, rtol=1e-6, atol=1e-7)
    assert np.asarray(weight.dequantize(jnp.bfloat16)).dtype == jnp.bfloat16


def test_average_bits_hand_computed(rng):
    """32 x 64, 3-bit codes, groups of 16, 3/3-bit statistics in groups of 16 rows, 5 outliers, act-order:
    codes 64*32*3 = 6144, scale + zero codes 2 * 4*32*3 = 768, second-level fp16 pairs 2 * 4*2*2*16 = 512,
    row pointers 33*32 = 1056, outliers 5 * (16 + 16) = 160, permutation 64*16 = 1024: 9664 bits / 2048 weights.
    The paper's formula: 3 + (3 + 3)/16 + 64/(16*16) + 32 * 5/2048 = 3.703125 (no row pointers, no permutation)."""
    weight, _ = hand_built(rng, perm=True)
    assert weight.nbytes * 8 == 9664 and weight.avg_bits() == 9664 / 2048 == 4.71875
    assert weight.paper_avg_bits() == 3.703125
    no_perm, _ = hand_built(rng, perm=False)
    assert no_perm.avg_bits() == (9664 - 1024) / 2048
    # The README recipes, without outliers: 4.625 and 3.625 bits; 1% outliers add 0.32.
    assert spqr_average_bits(4, 16, 3, 3, 16) == 4.625
    assert math.isclose(spqr_average_bits(3, 16, 3, 3, 16, 0.01), 3.945, rel_tol=1e-12)


# ------------------------------------------------------------------------------------------ pipeline, checkpoint
SPQR_TINY = dict(bits=3, block_size=32)  # README recipe at 3 bits; small blocks for the 64-wide layers


@pytest.fixture(scope="module")
def quantized_llama(tiny_hf):
    from conftest import new_seed, run_recorded

    lm = tiny_hf("llama").loaded
    calib = np.random.default_rng(new_seed()).integers(0, 128, (4, 32)).astype(np.int32)
    return run_recorded(lm, calib, SpQRConfig(**SPQR_TINY), "spqr")


def _spqr_leaves(params):
    from flax.traverse_util import flatten_dict

    flat = flatten_dict(params, is_leaf=lambda _, v: isinstance(v, SpQRWeight))
    return {"/".join(k): v for k, v in flat.items() if isinstance(v, SpQRWeight)}


def test_pipeline_and_orbax_round_trip(quantized_llama, tmp_path, rng):
    from conftest import jit_logits
    from jaxquant import checkpoint
    from jaxquant.formats import quantized_bits

    q = quantized_llama
    leaves = _spqr_leaves(q.params)
    order = [n for g in q.lm.family.SEQUENTIAL_GROUPS for n in g]
    assert sorted(leaves) == sorted(f"layers_{i}/{n}/kernel" for i in range(2) for n in order)
    assert sum(leaf.nnz for leaf in leaves.values()) > 0
    # The pipeline's leaf is spqr() of the (W, H) it was given.
    W, H = q.calls[0]
    again, _ = spqr(W, H, q.config)
    first = leaves[f"layers_0/{order[0]}/kernel"]
    for f in dataclasses.fields(SpQRWeight):
        a, b = getattr(first, f.name), getattr(again, f.name)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f.name)

    path = tmp_path / "ckpt"
    checkpoint.save(str(path), q.params, q.lm, "spqr", q.config, q.report)
    loaded = checkpoint.load(str(path))
    for key, leaf in _spqr_leaves(loaded.params).items():
        for f in dataclasses.fields(SpQRWeight):
            a, b = getattr(leaf, f.name), getattr(leaves[key], f.name)
            if hasattr(b, "dtype"):
                assert a.dtype == b.dtype and a.shape == b.shape, (key, f.name)
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"{key}.{f.name}")
            else:
                assert a == b, (key, f.name)
    ids = rng.integers(0, 128, (2, 12)).astype(np.int32)
    logits = jit_logits(loaded.module, loaded.params, ids)
    np.testing.assert_array_equal(logits, jit_logits(q.lm.module, q.params, ids))
    assert np.all(np.isfinite(logits))
    meta = loaded.quant_meta
    assert meta["method"] == "spqr" and meta["quant_config"] == dataclasses.asdict(q.config)
    assert meta["avg_bits"] == quantized_bits(q.params)["avg_bits"] > 3.625
    raw = json.loads((path / checkpoint.METADATA_FILE).read_text())
    entry = raw["quantized"]["layers_0/self_attn/k_proj/kernel"]
    assert entry["format"] == "SpQRWeight" and entry["in_features"] == 64 and entry["out_features"] == 32


def test_pipeline_falcon(tiny_hf, rng):
    """Falcon's fused QKV (96 outputs) and parallel attention + MLP; OPT's linears are all 64 x 64 like LLaMA's (the
    family plumbing itself is tested for every family in test_pipeline.py)."""
    from conftest import jit_logits
    from jaxquant.pipeline import quantize_model

    lm = tiny_hf("falcon").loaded
    calib = rng.integers(0, 128, (4, 32)).astype(np.int32)
    params, report = quantize_model(lm, calib, SpQRConfig(**SPQR_TINY), method="spqr", progress=False)
    leaves = _spqr_leaves(params)
    assert len(leaves) == len(report.layers) == 2 * sum(len(g) for g in lm.family.SEQUENTIAL_GROUPS)
    assert leaves["layers_0/self_attention/query_key_value/kernel"].shape == (64, 96)
    assert all(math.isfinite(r["error"]) for r in report.layers)
    ids = rng.integers(0, 128, (1, 8)).astype(np.int32)
    ref = jit_logits(lm.module, lm.params, ids)
    got = jit_logits(lm.module, params, ids)
    assert np.all(np.isfinite(got)) and 0 < np.abs(got - ref).max() < np.abs(ref).max()


def test_cli_quantize_spqr(quantized_llama, tmp_path, capsys, monkeypatch):
    """``jaxquant quantize --method spqr`` with the README recipe spelled out gives the same checkpoint as
    quantize_model with that SpQRConfig (the model and calibration windows are the fixture's)."""
    import models
    from jaxquant import checkpoint, data
    from jaxquant.cli import main

    q = quantized_llama
    monkeypatch.setattr(models, "from_pretrained", lambda *a, **k: q.lm)
    monkeypatch.setattr(data, "calibration_windows", lambda *a, **k: q.calib)
    out = tmp_path / "q"
    capsys.readouterr()
    assert main(["quantize", "--model", "tiny", "--method", "spqr", "--bits", "3", "--group-size", "16",
                 "--qq-scale-bits", "3", "--qq-zero-bits", "3", "--qq-groupsize", "16", "--outlier-threshold", "0.2",
                 "--act-order", "--percdamp", "1.0", "--block-size", "32", "--nsamples", "4", "--seqlen", "32",
                 "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["method"] == "spqr" and summary["outlier_relative_threshold"] == 0.2
    assert summary["total_error"] == q.report.total_error()
    loaded = checkpoint.load(str(out))
    assert loaded.quant_meta["method"] == "spqr"
    assert loaded.quant_meta["quant_config"] == dataclasses.asdict(q.config) == dataclasses.asdict(
        SpQRConfig(**SPQR_TINY))
    want = _spqr_leaves(q.params)
    for key, leaf in _spqr_leaves(loaded.params).items():
        np.testing.assert_array_equal(np.asarray(leaf.dequantize()), np.asarray(want[key].dequantize()), key)
    assert len(want) == 14


@pytest.mark.parametrize("argv,message", [
    (["--method", "spqr", "--sym"], "--sym is not supported with --method spqr"),
    (["--method", "spqr", "--export-gptq", "x"], "--export-gptq is not supported with --method spqr"),
    (["--method", "spqr", "--qq-scale-bits", "5"], "invalid SpQR settings: qq_scale_bits=5 is not supported"),
    (["--method", "gptq", "--outlier-threshold", "0.2"], "--outlier-threshold applies to --method spqr only"),
])
def test_cli_rejects_bad_spqr_options(argv, message, tmp_path):
    from jaxquant.cli import main

    with pytest.raises(SystemExit, match=message):
        main(["quantize", "--model", str(tmp_path / "unused"), "--out", str(tmp_path / "q"), *argv])


# ------------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("fields,message", [
    (dict(bits=5), r"bits=5 is not supported"),
    (dict(qq_scale_bits=None), r"qq_scale_bits=None is not supported.*16-bit statistics"),
    (dict(group_size=-1), r"group_size=-1 must be a positive"),
    (dict(qq_groupsize=0), r"qq_groupsize=0 must be a positive"),
    (dict(outlier_relative_threshold=float("nan")), r"outlier_relative_threshold=nan must be >= 0"),
    (dict(outlier_relative_threshold=-1.0), r"must be >= 0"),
    (dict(round_zero=True), r"round_zero=True with qq_zero_bits=3 >= bits=3"),
    (dict(percdamp=-0.1), r"percdamp=-0.1 must be >= 0"),
])
def test_bad_config(fields, message):
    base = dict(bits=3)
    with pytest.raises(ValueError, match=message):
        SpQRConfig(**{**base, **fields})


def test_bad_shapes_and_values(rng):
    W, H = problem(rng)
    cfg = SpQRConfig(bits=3)
    with pytest.raises(ValueError, match=r"group_size=48 does not divide in_features=256"):
        spqr(W, H, dataclasses.replace(cfg, group_size=48))
    with pytest.raises(ValueError, match=r"qq_groupsize=48 does not divide out_features=64"):
        spqr(W, H, dataclasses.replace(cfg, qq_groupsize=48))
    with pytest.raises(ValueError, match=r"H has shape \(255, 255\)"):
        spqr(W, H[:-1, :-1], cfg)
    with pytest.raises(ValueError, match=r"in_features has length 100"):
        spqr(W[:, :100], H[:100, :100], dataclasses.replace(cfg, group_size=20))
    bad = W.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="W contains NaN or Inf"):
        spqr(bad, H, cfg)
    bad = H.copy()
    bad[3, 3] = np.inf
    with pytest.raises(ValueError, match="Hessian H contains NaN or Inf"):
        spqr(W, bad, cfg)
    from jaxquant.config import QuantConfig

    with pytest.raises(TypeError, match="spqr needs a SpQRConfig, got QuantConfig"):
        spqr(W, H, QuantConfig())
    with pytest.warns(UserWarning, match="SpQR: Cholesky failed"):
        with pytest.raises(ValueError, match=r"not positive definite after 1 damping retries"):
            spqr(W, -H, dataclasses.replace(cfg, percdamp=0.1, damp_retries=1))


def test_corrupt_stored_arrays_are_named(rng):
    weight, _ = hand_built(rng)
    with pytest.raises(ValueError, match=r"scale_qq is float32\[4, 2, 2\], expected float16"):
        dataclasses.replace(weight, scale_qq=weight.scale_qq.astype(jnp.float32)).check_shapes()
    with pytest.raises(ValueError, match="qweight is int32"):
        dataclasses.replace(weight, qweight=weight.qweight[:-1]).check_shapes()
    with pytest.raises(ValueError, match="perm is not a permutation"):
        dataclasses.replace(weight, perm=jnp.zeros(64, jnp.int16)).check_shapes()
    with pytest.raises(ValueError, match=r"row_ptr is int32\[32\], expected int32\[33\]"):
        dataclasses.replace(weight, row_ptr=weight.row_ptr[:-1]).check_shapes()


@pytest.mark.parametrize("nnz", [1, 5, 8, 13])
def test_eager_outlier_scatter_pads_without_changing_the_result(rng, nnz):
    """The eager dequantize path (numpy rows, entries padded to a power of two by repeating the first) against a
    numpy scatter and against the traced path."""
    from jaxquant.sparse import csr_from_mask, row_ids, set_entries_transposed

    n, k = 6, 10
    mask = np.zeros(n * k, bool)
    mask[rng.choice(n * k, nnz, replace=False)] = True
    mask = mask.reshape(n, k)
    values = rng.normal(size=(n, k)).astype(np.float32)
    csr = csr_from_mask(values, mask)
    dense = rng.normal(size=(k, n)).astype(np.float32)  # kernel layout [K, N]
    want = dense.copy()
    want[mask.T] = values.astype(np.float16).astype(np.float32).T[mask.T]
    got = set_entries_transposed(jnp.asarray(dense), csr.row_ptr, csr.col_idx, csr.values)
    np.testing.assert_array_equal(np.asarray(got), want)
    traced = jax.jit(set_entries_transposed)(jnp.asarray(dense), csr.row_ptr, csr.col_idx, csr.values)
    np.testing.assert_array_equal(np.asarray(traced), want)
    scatter = jax.jit(lambda d, rp, ci, v: d.at[ci.astype(jnp.int32), row_ids(rp, nnz)].set(v.astype(jnp.float32)))
    np.testing.assert_array_equal(np.asarray(scatter(jnp.asarray(dense), csr.row_ptr, csr.col_idx, csr.values)), want)
