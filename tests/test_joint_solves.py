"""Joint solves: linears that share one Hessian (q/k/v, up/gate) quantized as ONE GPTQ call over their stacked output
rows give exactly the codes of separate calls (GPTQ is row-independent given H), and their per-row errors add up to
the separate errors; the format's output split/concat is exact; the pipeline's joint path equals separate solves."""
from __future__ import annotations

import numpy as np
import pytest

from jaxquant.config import QuantConfig
from jaxquant.formats import UniformQuantizedWeight
from jaxquant.gptq import gptq

FIELDS = ("qweight", "qzeros", "scales", "g_idx")


def _same(got, want, what=""):
    for f in ("bits", "group_size", "sym", "in_features", "out_features"):
        assert getattr(got, f) == getattr(want, f), (what, f)
    for f in FIELDS:
        np.testing.assert_array_equal(np.asarray(getattr(got, f)), np.asarray(getattr(want, f)), err_msg=f"{what}.{f}")


def _problem(rng, sizes, K):
    Ws = [rng.standard_normal((n, K)).astype(np.float32) * rng.uniform(0.5, 2.0) for n in sizes]
    X = rng.standard_normal((3 * K, K)).astype(np.float32) * rng.uniform(0.1, 3, K).astype(np.float32)
    return Ws, (2 * X.T @ X / X.shape[0]).astype(np.float32)


@pytest.mark.parametrize("cfg", [dict(bits=4, group_size=32), dict(bits=3, group_size=-1, act_order=True),
                                 dict(bits=2, group_size=32, act_order=True, static_groups=True, sym=True)])
def test_stacked_solve_same_codes_as_separate(rng, cfg):
    cfg = QuantConfig(**cfg)
    sizes, K = (64, 32, 32), 128  # q, k, v of a GQA layer: different output widths
    Ws, H = _problem(rng, sizes, K)
    stacked, row_err, deq = gptq(np.concatenate(Ws), H, cfg, return_dequantized=True, row_errors=True)
    assert row_err.shape == (sum(sizes),) and np.all(row_err >= 0) and row_err.sum() > 0
    np.testing.assert_array_equal(np.asarray(deq), np.asarray(stacked.dequantize()).T)
    parts = stacked.split_outputs(sizes)
    errs = np.split(row_err, np.cumsum(sizes)[:-1])
    for i, (W, part, err) in enumerate(zip(Ws, parts, errs)):
        alone, err_alone = gptq(W, H, cfg)
        _same(part, alone, f"linear {i}")
        assert abs(err.sum() - err_alone) <= 1e-5 * err_alone, (i, err.sum(), err_alone)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_split_and_concat_outputs_exact(rng, bits):
    K, sizes = 64, (32, 64, 32)
    N = sum(sizes)
    codes = rng.integers(0, 2**bits, (N, K))
    scales = rng.uniform(0.1, 1, (2, N)).astype(np.float32)
    zeros = rng.integers(0, 2**bits, (2, N))
    g_idx = np.arange(K) // 32
    qw = UniformQuantizedWeight.from_codes(codes, scales, zeros, g_idx, bits=bits, group_size=32, sym=False)
    parts = qw.split_outputs(sizes)
    start = 0
    for n, part in zip(sizes, parts):  # each part is the weight built from its own rows alone
        want = UniformQuantizedWeight.from_codes(codes[start:start + n], scales[:, start:start + n],
                                                 zeros[:, start:start + n], g_idx, bits=bits, group_size=32, sym=False)
        _same(part, want, f"part at {start}")
        start += n
    host = [UniformQuantizedWeight(**{f: np.asarray(getattr(p, f)) for f in FIELDS}, bits=p.bits,
                                   group_size=p.group_size, sym=p.sym, in_features=p.in_features,
                                   out_features=p.out_features) for p in parts]
    _same(UniformQuantizedWeight.concat_outputs(host), qw, "concat")
    unit = UniformQuantizedWeight.output_unit(bits)
    if unit > 1:
        with pytest.raises(ValueError, match="multiple of"):
            qw.split_outputs((unit + 1, N - unit - 1))


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_pipeline_joint_solves_equal_separate_solves(rng, tiny_hf, family):
    from flax.traverse_util import flatten_dict

    from jaxquant import pipeline

    lm = tiny_hf(family).loaded
    calib = rng.integers(0, 128, (4, 32)).astype(np.int32)
    cfg = QuantConfig(bits=4, group_size=32, act_order=True)
    joint, r_joint = pipeline.quantize_model(lm, calib, cfg, batch_size=4, progress=False)
    pipeline.METHODS["_gptq_separate"] = pipeline.Method("_gptq_separate", pipeline.METHODS["gptq"].solve)
    try:
        separate, r_sep = pipeline.quantize_model(lm, calib, cfg, method="_gptq_separate", batch_size=4,
                                                  progress=False)
    finally:
        del pipeline.METHODS["_gptq_separate"]
    # q/k/v (and up/gate) really went through one solve
    stacked = {tuple(r["solved_with"]) for r in r_joint.layers}
    first = lm.family.SEQUENTIAL_GROUPS[0]
    assert tuple(first) in stacked and all(len(r["solved_with"]) == 1 for r in r_sep.layers)
    is_q = lambda _, v: isinstance(v, UniformQuantizedWeight)  # noqa: E731
    a, b = flatten_dict(joint, is_leaf=is_q), flatten_dict(separate, is_leaf=is_q)
    quantized = [k for k, v in a.items() if isinstance(v, UniformQuantizedWeight)]
    assert quantized and a.keys() == b.keys()
    for k in quantized:
        _same(a[k], b[k], "/".join(k))
    for x, y in zip(r_joint.layers, r_sep.layers):
        assert (x["layer"], x["name"]) == (y["layer"], y["name"])
        assert abs(x["error"] - y["error"]) <= 1e-4 * max(y["error"], 1e-12), (x, y)
