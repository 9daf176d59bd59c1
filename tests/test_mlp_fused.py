"""bench/mlp_fused.py (CPU): the one-kernel decode MLP probe. Its jnp reference (the kernel's two stream-K phases and
the rounded SwiGLU between them) against a float64 numpy oracle of RMSNorm -> SiLU(x @ gate) * (x @ up) -> @ down;
the phase plans; the rule and the errors; the kernel lowers for CUDA with its semaphore and, per timing variant,
without the parts it leaves out."""
import json

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from bench import mlp_fused as mf
from bench.timing import rewrite_table
from pallas_kernels import gptq_matmul as gm
from tests.test_kernels import oracle_weight, random_gptq


def _weights(rng, K, I, N, bits, act=False):
    out = []
    for k, n in ((K, 2 * I), (I, N)):
        codes, scales, zeros, g_idx = random_gptq(rng, k, n, bits, 128, False, act)
        out.append((gm.pack(codes, scales, zeros, g_idx, bits=bits, sym=False),
                    oracle_weight(codes, scales, zeros, g_idx, "bfloat16")))
    return out


def _inputs(rng, K):
    x = jnp.asarray(3.0 * rng.standard_normal((1, K)), jnp.bfloat16)
    scale = jnp.asarray(rng.uniform(0.5, 1.5, K), jnp.bfloat16)
    return x, scale


@pytest.mark.parametrize("bits,K,I,N", [(4, 512, 384, 384), (3, 768, 640, 256)])
def test_reference_matches_float64_oracle(rng, bits, K, I, N):
    """I = 384 / 640 leave act's last block partly past I (zeros); the CTA count is drawn so the stream-K pieces
    and the phase padding differ per run."""
    (w_gu, d_gu), (w_dn, d_dn) = _weights(rng, K, I, N, bits)
    x, scale = _inputs(rng, K)
    pairs = min(gm.ws_pairs(w_gu, mf.MLP_TILE_K), gm.ws_pairs(w_dn, mf.MLP_TILE_K))
    ctas = int(rng.integers(2, pairs + 1))
    got = np.asarray(mf.reference_fused_mlp(x, scale, 1e-5, w_gu, w_dn, ctas=ctas), np.float64)
    x64 = np.asarray(x, np.float64)
    want = mf.numpy_mlp_oracle(x64, np.asarray(scale, np.float64), 1e-5, d_gu[:, :I], d_gu[:, I:], d_dn)
    assert np.isfinite(got).all()
    err = np.max(np.abs(got - want)) / np.max(np.abs(want))
    assert err < 2e-2, (ctas, err)
    # the oracle sees the structure: dropping the SiLU or swapping gate and up moves it far off
    wrong = mf.numpy_mlp_oracle(x64, np.asarray(scale, np.float64), 1e-5, d_gu[:, I:], d_gu[:, :I], d_dn)
    assert np.max(np.abs(got - wrong)) / np.max(np.abs(want)) > 10 * err


def test_swiglu_rounded_is_xlas_bf16_silu_times_up(rng):
    g = jnp.asarray(4.0 * rng.standard_normal(4096), jnp.bfloat16)
    u = jnp.asarray(4.0 * rng.standard_normal(4096), jnp.bfloat16)
    got = np.asarray(mf.swiglu_rounded(g, u), np.float64)
    want = np.asarray(jax.jit(lambda g, u: jax.nn.silu(g) * u)(g, u), np.float64)
    ulp = np.maximum(np.abs(want), 1e-30) * 2.0**-7
    assert np.max(np.abs(got - want) / ulp) <= 1.0


def test_plan_grids_are_stage_multiples(rng):
    for _ in range(5):
        ka, na = 256 * int(rng.integers(2, 20)), 128 * int(rng.integers(2, 40))
        kb, nb = 256 * int(rng.integers(2, 20)), 128 * int(rng.integers(2, 40))
        pairs = min(ka // 256 * na // 128, kb // 256 * nb // 128)
        ctas = int(rng.integers(1, pairs + 1))
        *phases, stages = mf.mlp_plan(ka, na, kb, nb, ctas)
        assert stages in (3, 4)
        for (units, spu, slots, grid), (k, n) in zip(phases, ((ka, na), (kb, nb))):
            q, r, want_slots = gm.ws_plan(n // 128, k // 256, ctas)
            assert (units, spu, slots) == (n // 128, k // 256, want_slots)
            assert grid % stages == 0 and q + (r > 0) <= grid < q + (r > 0) + stages
    with pytest.raises(ValueError, match="ctas"):
        mf.mlp_plan(512, 256, 512, 256, 5)  # 4 pairs per phase


def test_rule_and_errors(rng):
    (w_gu, _), (w_dn, _) = _weights(rng, 512, 384, 384, 4)
    x, scale = _inputs(rng, 512)
    assert mf.fused_mlp_ok(w_gu, w_dn, 1)
    assert not mf.fused_mlp_ok(w_gu, w_dn, 2)
    (w_gu_act, _), _ = _weights(rng, 512, 384, 384, 4, act=True)
    assert not mf.fused_mlp_ok(w_gu_act, w_dn, 1)  # act-order: the fused norm cannot gather x
    _, (w_dn3, _) = _weights(rng, 512, 384, 384, 3)
    assert not mf.fused_mlp_ok(w_gu, w_dn3, 1)  # one format for both phases
    assert not mf.fused_mlp_ok(w_dn, w_gu, 1)  # gate/up must be 2 x down's inputs
    with pytest.raises(ValueError, match="one row"):
        mf.fused_mlp(jnp.concatenate([x, x]), scale, 1e-5, w_gu, w_dn)
    with pytest.raises(ValueError, match="RMSNorm scale"):
        mf.fused_mlp(x, scale[:100], 1e-5, w_gu, w_dn)
    with pytest.raises(ValueError, match="skip"):
        mf.fused_mlp(x, scale, 1e-5, w_gu, w_dn, skip=("norm",))
    with pytest.raises(ValueError, match="SMs"):
        mf.fused_mlp(x, scale, 1e-5, w_gu, w_dn, ctas=mf.device_sms() + 1)


def _lowered(x, scale, w_gu, w_dn, **kw):
    return jax.jit(lambda x, s, a, b: mf.fused_mlp(x, s, 1e-5, a, b, **kw)).trace(
        x, scale, w_gu, w_dn).lower(lowering_platforms=("cuda",)).as_text()


def test_kernel_lowers_for_cuda(rng):
    """One Mosaic GPU call with the zero-filled semaphore operand; the variants without barriers have none."""
    (w_gu, _), (w_dn, _) = _weights(rng, 512, 384, 384, 4)
    x, scale = _inputs(rng, 512)
    text = _lowered(x, scale, w_gu, w_dn, ctas=5)
    assert "fused_mlp_ws5" in text and "output_operand_alias" in text
    assert "stablehlo.rsqrt" not in text and "logistic" not in text  # the norm and the SiLU are inside the kernel
    poisoned = _lowered(x, scale, w_gu, w_dn, ctas=5, out_init=mf.mlp_output_buffers(w_gu, w_dn, 5))
    assert "mosaic_gpu" in poisoned and "output_operand_alias" in poisoned  # in place: the caller's 3 buffers
    bare = _lowered(x, scale, w_gu, w_dn, ctas=5, skip=mf.SKIPPABLE)
    assert "fused_mlp_ws5" in bare and "output_operand_alias" not in bare


def test_table_has_every_row_per_run(tmp_path, rng):
    """The markdown keeps every check and timing row, under one section per (date, command), newest first."""
    def row(date, kind):
        base = dict(date=date, device="GPU", jax="0", command=f"c {date}", kind=kind, format="gptq-w4g128",
                    shape="4096x11008x4096")
        if kind == "check":
            return dict(base, ctas=132, rel_err=float(rng.uniform(0, 1e-2)), rel_err_vs_unfused=0.0, ok=True)
        return dict(base, pass_=0, path=str(rng.choice(list(mf.VARIANTS))), us=1.0, pallas_us=1.0,
                    kernels=[("k", 1.0)], chain_wall_us=None)
    rows = [row(d, k) for d in ("2026-01-01T00:00Z", "2026-01-02T00:00Z") for k in ("check", "timing", "timing")]
    path = tmp_path / "m.json"
    path.write_text(json.dumps(rows))
    rewrite_table(str(path), mf.write_table)
    text = (tmp_path / "m.md").read_text()
    body = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith(("| check", "| ---",
                                                                                                  "| format"))]
    assert len(body) == len(rows)
    assert text.index("2026-01-02") < text.index("2026-01-01")


def test_checked_probe_stops_before_timing_on_a_wrong_check(tmp_path, rng):
    """``bench.timing.run_checked_probe`` (the fused-kernel probes' run): check rows are written at once; a wrong one
    stops the run before the timing (and the file keeps it); right checks are followed by the timing rows, every row
    carrying the run's keys and the extra ones."""
    import types

    from bench.timing import run_checked_probe

    written = []

    def write_table(rows, md_path):
        written.append((len(rows), md_path))

    out = str(tmp_path / "probe.json")
    args = types.SimpleNamespace(out=out, no_timing=False)
    err = float(rng.uniform(1e-3, 1e-2))
    timed = []
    with pytest.raises(SystemExit, match="1 check"):
        run_checked_probe(args, "probe", write_table, lambda: [dict(kind="check", ok=True, rel_err=err),
                                                               dict(kind="check", ok=False, rel_err=1.0)],
                          lambda: timed.append(1) or [], eps=1e-5)
    assert not timed and [r["ok"] for r in json.load(open(out))] == [True, False]
    rows = run_checked_probe(args, "probe", write_table, lambda: [dict(kind="check", ok=True, rel_err=err)],
                             lambda: [dict(kind="timing", us=12.5)], eps=1e-5)
    saved = json.load(open(out))
    assert [r["kind"] for r in rows] == [r["kind"] for r in saved] == ["check", "timing"]
    assert all(r["benchmark"] == "probe" and r["eps"] == 1e-5 and r["jax"] == jax.__version__ for r in saved)
    assert written[-1] == (2, str(tmp_path / "probe.md"))
    run_checked_probe(types.SimpleNamespace(out=None, no_timing=True), "probe", write_table,
                      lambda: [dict(kind="check", ok=True)], lambda: timed.append(1) or [])
    assert not timed
