"""SqueezeLLM: the Fisher against an independent torch computation, the dense-and-sparse selection against numpy,
the LUT storage (packed codes, CSR part, dequantize == the algorithm's reconstruction), the model-wide outlier
threshold rule, argument errors, and ``jaxquant quantize --method squeezellm`` -> orbax checkpoint -> identical
logits."""
from __future__ import annotations

import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.formats_lut import LUTQuantizedWeight, sparse_mask, sparse_to_dense
from jaxquant.kmeans import kmeans
from jaxquant.sparse import csr_from_mask
from jaxquant.squeezellm import (SqueezeLLMConfig, count_kept, decompose, model_outlier_thresholds, quartiles,
                                 range_threshold, reconstruct, squeezellm)


# One shape and one selection for the single-matrix tests: their compiled programs are shared.
def LAYER_CFG(bits):
    return SqueezeLLMConfig(bits=bits, sensitive_pct=1.0, outlier_pct=2.0, outlier_scope="layer")


def _layer(rng, out=48, inp=64):
    """A weight with heavy tails (outliers) and a Fisher with a few dominant entries, both fresh."""
    W = (rng.standard_t(3, (out, inp)) * 0.02).astype(np.float32)
    F = (rng.exponential(1.0, (out, inp)) ** 4).astype(np.float32)
    F[5] = 0.0  # a row without Fisher mass: unit weights on its dense entries
    return W, F


# ---------------------------------------------------------------------------------------------------- config
def test_config_levels_and_errors():
    c = SqueezeLLMConfig.from_sparsity(3, 0.45)
    assert (c.bits, c.sensitive_pct, c.outlier_pct) == (3, 0.05, 0.4) and c.sparsity_pct == pytest.approx(0.45)
    assert (SqueezeLLMConfig.from_sparsity(4, 0.05).outlier_pct, SqueezeLLMConfig.from_sparsity(4, 0).sparsity_pct) \
        == (0.0, 0.0)
    for kwargs, message in [(dict(bits=2), "bits=2 is not supported"), (dict(bits=8), "bits=8 is not supported"),
                            (dict(sensitive_pct=-0.1), "sensitive_pct=-0.1 is out of range"),
                            (dict(outlier_pct=100.0), "outlier_pct=100.0 is out of range"),
                            (dict(sensitive_pct=60.0, outlier_pct=40.0), "must be < 100"),
                            (dict(outlier_scope="row"), "outlier_scope='row'"),
                            (dict(max_iter=0), "max_iter=0"), (dict(fisher_batch_size=0), "fisher_batch_size=0")]:
        with pytest.raises(ValueError, match=message):
            SqueezeLLMConfig(**kwargs)
    with pytest.raises(ValueError, match="sparsity=101 is out of range"):
        SqueezeLLMConfig.from_sparsity(4, 101)


def test_bad_matrices(rng):
    W, F = _layer(rng)
    cfg = SqueezeLLMConfig(bits=3)
    for args, message in [((W[0], F[0]), r"W must be \[out, in\]"), ((W, F[:, :32]), "fisher has shape"),
                          ((W, -F), "fisher must be finite and >= 0"),
                          ((np.full_like(W, np.nan), F), "W has non-finite values"),
                          ((W[:, :48], F[:, :48]), "in_features has length 48, which is not a multiple of 32")]:
        with pytest.raises(ValueError, match=message):
            squeezellm(*args, cfg)
    with pytest.raises(ValueError, match="lut must have shape"):
        LUTQuantizedWeight.from_codes(np.zeros((4, 32), np.int32), np.zeros((4, 4)), bits=3)


# ------------------------------------------------------------------------------------------- one matrix
@pytest.mark.parametrize("bits", [3, 4])
def test_decomposition_against_numpy(rng, bits):
    """Sparse selection = numpy top-k Fisher + |w| >= top-k magnitude; k-means on the remaining Fisher mass; table =
    sorted float16 centroids; every code = its nearest table value."""
    W, F = _layer(rng)
    parts = decompose(W, F, LAYER_CFG(bits))

    n_sens, n_out = count_kept(W.size, 1.0), count_kept(W.size, 2.0)
    want = np.zeros(W.size, bool)
    want[np.argsort(-F.reshape(-1).astype(np.float64), kind="stable")[:n_sens]] = True
    threshold = np.sort(np.abs(W).reshape(-1))[::-1][n_out - 1]
    want = want.reshape(W.shape) | (np.abs(W) >= threshold)
    mask = np.asarray(parts.mask)
    np.testing.assert_array_equal(mask, want)
    assert n_out <= np.sum(np.abs(W) >= threshold) and mask.sum() <= n_sens + np.sum(np.abs(W) >= threshold)

    weights = np.where(mask, 0.0, F)
    weights[5] = np.where(mask[5], 0.0, 1.0)
    ref = kmeans(W, weights, k=2**bits, init="quantile")  # oracle-tested in test_kmeans.py
    np.testing.assert_array_equal(np.asarray(parts.clusters.centroids), np.asarray(ref.centroids))
    lut = np.asarray(parts.lut)
    assert lut.dtype == np.float16 and lut.shape == (48, 2**bits)
    np.testing.assert_array_equal(lut, np.sort(np.asarray(ref.centroids), axis=1).astype(np.float16))
    d = (W.astype(np.float64)[:, :, None] - lut.astype(np.float64)[:, None, :]) ** 2
    codes = np.asarray(parts.codes)
    assert codes.min() >= 0 and codes.max() < 2**bits
    np.testing.assert_array_less(np.take_along_axis(d, codes[..., None], -1)[..., 0] - d.min(-1), 1e-12)
    # The sensitive weights steer the centroids: their Fisher-weighted error is far below the unweighted k-means'.
    plain = kmeans(W, np.where(mask, 0.0, 1.0), k=2**bits)
    deq_plain = np.take_along_axis(np.asarray(plain.centroids), np.asarray(plain.labels), 1)
    deq = np.take_along_axis(lut.astype(np.float32), codes, 1)
    dense = ~mask
    assert np.sum((F * (W - deq) ** 2)[dense]) < np.sum((F * (W - deq_plain) ** 2)[dense])


def test_sensitive_selection_ties_and_magnitudes(rng):
    """Exactly count entries, the largest first and the lower flat index among equal values (lax.top_k's order),
    with many ties; the magnitude threshold is the count-th largest |w|."""
    from jaxquant.squeezellm import magnitude_threshold, sensitive_mask

    F = rng.integers(0, 4, (48, 64)).astype(np.float32) * np.float32(0.375)
    count = count_kept(F.size, 1.0)
    want = np.zeros(F.size, bool)
    want[np.argsort(-F.reshape(-1), kind="stable")[:count]] = True
    np.testing.assert_array_equal(np.asarray(sensitive_mask(jnp.asarray(F), count)), want.reshape(F.shape))
    W, _ = _layer(rng)
    assert magnitude_threshold(W, 2.0) == np.sort(np.abs(W).reshape(-1))[::-1][count_kept(W.size, 2.0) - 1]
    assert magnitude_threshold(W, 0.0) == math.inf


@pytest.mark.parametrize("bits", [3, 4])
def test_stored_weight_round_trips(rng, bits):
    """Packed codes unpack to the codes; the CSR part holds exactly the kept float16 weights at exactly the kept
    positions; dequantize (jitted too) equals the algorithm's reconstruction; error is Fisher-weighted."""
    W, F = _layer(rng)
    cfg = LAYER_CFG(bits)
    qw, err = squeezellm(W, F, cfg)
    parts = decompose(W, F, cfg)
    qw.check_shapes()
    out, inp = W.shape
    assert qw.shape == (inp, out) and qw.qweight.shape == (inp * bits // 32, out) and qw.qweight.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(qw.codes()), np.asarray(parts.codes).T)
    np.testing.assert_array_equal(np.asarray(qw.lut), np.asarray(parts.lut))

    mask = np.asarray(parts.mask)
    assert 0 < qw.nnz == mask.sum()
    np.testing.assert_array_equal(sparse_mask(qw), mask)
    np.testing.assert_array_equal(np.asarray(qw.values), W[mask].astype(np.float16))  # row-major order
    np.testing.assert_array_equal(np.asarray(sparse_to_dense(qw)), np.where(mask, W.astype(np.float16), 0))

    recon = np.asarray(reconstruct(parts, W))
    deq = np.asarray(qw.dequantize()).T
    np.testing.assert_array_equal(deq, recon)
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda q: q.dequantize())(qw)).T, recon)
    np.testing.assert_array_equal(deq[mask], W[mask].astype(np.float16).astype(np.float32))  # kept values exact
    table = np.take_along_axis(np.asarray(parts.lut, np.float32), np.asarray(parts.codes), 1)
    np.testing.assert_array_equal(deq[~mask], table[~mask])
    # The reference's additive form: table value + delta = kept value.
    rows, cols = np.nonzero(mask)
    np.testing.assert_allclose(table[rows, cols] + np.asarray(qw.sparse_delta()), deq[rows, cols], rtol=1e-6)

    assert err == pytest.approx(float(np.sum(F.astype(np.float64) * (W.astype(np.float64) - deq) ** 2)), rel=1e-4)
    x = rng.standard_normal((3, inp)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(qw.matmul(jnp.asarray(x))), x.astype(np.float64) @ deq.T, rtol=1e-5,
                               atol=1e-6)
    # codes + float16 tables + CSR (int16 columns, float16 values, int32 row pointers)
    assert qw.avg_bits() == pytest.approx(bits + 16 * 2**bits / inp + 8 * (4 * qw.nnz + 4 * (out + 1)) / (out * inp))


@pytest.mark.parametrize("bits", [3, 4])
def test_packed_codes_round_trip(rng, bits):
    codes = rng.integers(0, 2**bits, (48, 64))
    codes[0] = np.arange(64) % 2**bits  # every code value present
    lut = rng.standard_normal((48, 2**bits)).astype(np.float16)
    qw = LUTQuantizedWeight.from_codes(codes, lut, bits=bits)
    np.testing.assert_array_equal(np.asarray(qw.codes()).T, codes)
    assert qw.nnz == 0 and qw.row_ptr.shape == (49,)
    np.testing.assert_array_equal(np.asarray(qw.dequantize()).T,
                                  np.take_along_axis(lut.astype(np.float32), codes, 1))


def test_model_wide_outlier_threshold(rng):
    """The reference's rule: T_i = max(|q1 - r IQR|, |q3 + r IQR|) per matrix with one r, the smallest r keeping at
    most pct % of all weights; heavier-tailed matrices give more outliers."""
    mats = {"a": rng.standard_normal((32, 64)), "b": rng.standard_t(2, (64, 32)), "c": rng.laplace(0, 1, (32, 32))}
    mats = {k: (v * 0.05).astype(np.float32) for k, v in mats.items()}
    pct = 1.5
    thresholds, r, frac = model_outlier_thresholds(mats, pct)
    total = sum(m.size for m in mats.values())

    def count(r):
        return sum(int(np.sum(np.abs(m) >= np.float32(range_threshold(*quartiles(m), r)))) for m in mats.values())

    for name, m in mats.items():
        q1, q3 = np.quantile(m.astype(np.float64), [0.25, 0.75])
        iqr = q3 - q1
        assert thresholds[name] == np.float32(max(abs(q1 - r * iqr), abs(q3 + r * iqr)))
    assert count(r) == round(frac * total) <= count_kept(total, pct) < count(r * (1 - 1e-6))
    per = {k: np.mean(np.abs(m) >= thresholds[k]) for k, m in mats.items()}
    assert per["b"] > per["a"]


# ------------------------------------------------------------------------------------------------ Fisher
def test_fisher_matches_torch_squared_gradients(tiny_hf, rng):
    """sum over samples of (d mean-NLL / d W)^2 for every decoder linear, against transformers' own model (same
    weights, labels = input ids) in float64 accumulation; also with 2 samples per vmapped gradient."""
    import torch

    from jaxquant.fisher import fisher_diagonal, linear_names

    b = tiny_hf("llama")
    ids = rng.integers(0, 128, (4, 12)).astype(np.int32)
    ours = fisher_diagonal(b.loaded, ids)
    ours2 = fisher_diagonal(b.loaded, ids, batch_size=2, remat=False)
    assert sorted(ours) == sorted(linear_names(b.loaded))
    ref = {}
    for sample in ids:
        b.hf.zero_grad()
        x = torch.as_tensor(sample[None]).long()
        b.hf(input_ids=x, labels=x, use_cache=False).loss.backward()
        for name, p in b.hf.named_parameters():
            if ".layers." in name and p.ndim == 2:
                ref[name] = ref.get(name, 0) + p.grad.double().numpy() ** 2
    for name, f in ours.items():
        layer, sub = name.split("/", 1)
        want = ref[f"model.layers.{layer[len('layers_'):]}.{sub.replace('/', '.')}.weight"].T
        scale = np.max(want)
        assert scale > 0
        assert np.max(np.abs(np.asarray(f) - want)) <= 1e-5 * scale, name
        assert np.max(np.abs(np.asarray(ours2[name]) - want)) <= 1e-5 * scale, name
    with pytest.raises(ValueError, match="not a multiple of batch_size=3"):
        fisher_diagonal(b.loaded, ids, batch_size=3)


# ------------------------------------------------------------------------------------------------- end to end
TEXT = ("The committee met on Tuesday to discuss the new bridge over the river. After a long debate, the members "
        "agreed that construction should begin in the spring, once the ground has thawed and the roads are clear. "
        "Several residents asked about the noise, and the chair promised regular updates on the town website. ") * 3


def test_cli_quantize_checkpoint(tiny_hf, smollm2_tokenizer, tmp_path, capsys):
    """``jaxquant quantize --method squeezellm`` writes a checkpoint whose every decoder linear, loaded back, is
    exactly the ``squeezellm()`` of its kernel with the model's Fisher and model-wide outlier threshold."""
    from flax.traverse_util import flatten_dict

    from jaxquant import checkpoint, data
    from jaxquant.cli import main
    from jaxquant.formats import quantized_bits
    from jaxquant.squeezellm import model_stats

    tok = smollm2_tokenizer
    b = tiny_hf("llama", vocab_size=len(tok))
    model_dir = tmp_path / "model"
    shutil.copytree(b.dir, model_dir)
    tok.save_pretrained(str(model_dir))
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    out = tmp_path / "q"
    capsys.readouterr()
    assert main(["quantize", "--model", str(model_dir), "--method", "squeezellm", "--bits", "3", "--sparsity", "1.0",
                 "--nsamples", "2", "--seqlen", "16", "--calib", str(text), "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["method"] == "squeezellm" and summary["bits"] == 3 and summary["outlier_pct"] == 0.95
    loaded = checkpoint.load(str(out))

    lm = b.loaded
    calib = data.calibration_windows(tok, n=2, seqlen=16, seed=0, source=str(text))
    cfg = SqueezeLLMConfig.from_sparsity(3, 1.0)
    stats = model_stats(lm, calib, cfg)
    got = flatten_dict(loaded.params, is_leaf=lambda _, v: isinstance(v, LUTQuantizedWeight))
    leaves = {k: v for k, v in got.items() if isinstance(v, LUTQuantizedWeight)}
    assert len(leaves) == 7 * lm.config.num_layers
    kept = 0
    for path, leaf in leaves.items():
        name = "/".join(path[:-1])
        kernel = np.asarray(flatten_dict(lm.params)[path])
        want, _ = squeezellm(kernel.T, stats[name]["fisher"].T, cfg, stats[name]["outlier_threshold"])
        for field in ("qweight", "lut", "row_ptr", "col_idx", "values"):
            np.testing.assert_array_equal(np.asarray(getattr(leaf, field)), np.asarray(getattr(want, field)),
                                          err_msg=f"{name}.{field}")
        kept += leaf.nnz
    n_weights = sum(v.in_features * v.out_features for v in leaves.values())
    assert 0 < kept <= count_kept(n_weights, 1.0) + count_kept(n_weights, 0.05)
    assert loaded.quant_meta["avg_bits"] == pytest.approx(quantized_bits(loaded.params)["avg_bits"])

    # (bit-identical logits of a loaded checkpoint: test_dense_model_checkpoint_round_trip, on a cheaper model)
    # (`jaxquant eval --model DIR` is this same checkpoint.load + forward; test_pipeline runs the eval command.)
    with pytest.raises(SystemExit, match="--group-size is not supported with --method squeezellm"):
        main(["quantize", "--model", str(model_dir), "--method", "squeezellm", "--group-size", "32", "--out",
              str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="--sparsity applies to --method squeezellm only"):
        main(["quantize", "--model", str(model_dir), "--method", "gptq", "--sparsity", "0.45", "--out",
              str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="invalid SqueezeLLM settings: SqueezeLLM bits=8"):
        main(["quantize", "--model", str(model_dir), "--method", "squeezellm", "--bits", "8", "--out",
              str(tmp_path / "x")])


def test_dense_model_checkpoint_round_trip(tiny_hf, tmp_path, rng):
    """Sparsity 0: every linear has an empty CSR part (zero-size arrays), which the checkpoint must restore; the
    pipeline refuses to run without calibration."""
    from conftest import jit_logits

    from jaxquant import checkpoint
    from jaxquant.formats import quantized_bits
    from jaxquant.pipeline import quantize_model

    lm = tiny_hf("llama").loaded
    with pytest.raises(ValueError, match=r"needs calibration token ids of shape \[n, seqlen\]"):
        quantize_model(lm, None, SqueezeLLMConfig(), method="squeezellm", progress=False)
    calib = rng.integers(0, 128, (2, 12)).astype(np.int32)
    cfg = SqueezeLLMConfig(bits=4)
    params, report = quantize_model(lm, calib, cfg, method="squeezellm", progress=False)

    from jaxquant.fisher import fisher_diagonal
    from jaxquant.squeezellm import model_stats

    given = fisher_diagonal(lm, calib)  # a Fisher computed once can be shared by several configurations
    shared = model_stats(lm, None, SqueezeLLMConfig.from_sparsity(3, 0.45), fisher=given)
    for name, f in given.items():
        np.testing.assert_array_equal(shared[name]["fisher"], np.asarray(f))
        assert 0 < shared[name]["outlier_threshold"] < math.inf
    with pytest.raises(ValueError, match="the given Fisher has no entry for"):
        model_stats(lm, None, cfg, fisher={k: v for k, v in given.items() if "down_proj" not in k})
    assert len(report.layers) == 7 * lm.config.num_layers and report.nsamples == 2 and report.seqlen == 12
    checkpoint.save(str(tmp_path / "q"), params, lm, "squeezellm", cfg, report)
    loaded = checkpoint.load(str(tmp_path / "q"))
    bits = quantized_bits(loaded.params)
    assert bits["avg_bits"] == pytest.approx(4 + 16 * 16 / 64 + 8 * 4 * (64 * 5 + 32 * 2 + 7) * 2 / bits["quantized_params"])
    ids = rng.integers(0, 128, (2, 12)).astype(np.int32)
    np.testing.assert_array_equal(jit_logits(loaded.module, loaded.params, ids), jit_logits(lm.module, params, ids))
