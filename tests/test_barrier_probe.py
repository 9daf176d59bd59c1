"""bench/barrier_probe.py (CPU): the semaphore kernels lower for CUDA with the zero-filled, aliased scratch operand
that Pallas adds for a global semaphore (and the plain kernel without it), a bad mode is rejected by name, and the
table keeps every row."""
import argparse
import json

import jax
import jax.numpy as jnp
import pytest

from bench import barrier_probe
from bench.timing import parse_probe_args, rewrite_table
from bench.launch_probe import X_SHAPE


def _lowered(fn):
    return jax.jit(fn).trace(jnp.ones(X_SHAPE, jnp.bfloat16)).lower(lowering_platforms=("cuda",)).as_text()


def test_semaphore_kernels_carry_the_zeroed_scratch():
    for mode in barrier_probe.MODES:
        text = _lowered(barrier_probe.semaphore_kernel(mode, ctas=4, warpgroups=3, smem_kb=1))
        assert text.count("mosaic_gpu") >= 1
        assert ("output_operand_alias" in text) == (mode != "none"), mode  # the semaphore buffer, zeroed per call
    with pytest.raises(ValueError, match="mode"):
        barrier_probe.semaphore_kernel("fence")


def test_table_has_every_row(tmp_path, rng):
    rows = [dict(date="2026-01-01T00:00Z", device="GPU", jax="0", command="c", mode=mode, ctas=132, warpgroups=3,
                 smem_kb=200, kernels=[("probe", round(float(rng.uniform(1, 9)), 2))],
                 cupti_us=round(float(rng.uniform(1, 9)), 2), chain_calls=128,
                 wall_us_per_call=round(float(rng.uniform(1, 9)), 2), output_ok=bool(rng.integers(2)))
            for _ in range(2) for mode in barrier_probe.MODES]
    path = tmp_path / "b.json"
    path.write_text(json.dumps(rows))
    rewrite_table(str(path), barrier_probe.write_table)
    lines = [line for line in (tmp_path / "b.md").read_text().splitlines()
             if line.startswith("| ") and not line.startswith(("| semaphore", "| ---"))]
    assert len(lines) == len(rows)
    for r, line in zip(rows, lines):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == r["mode"] and cells[3] == str(r["cupti_us"]) and cells[5] == str(r["output_ok"])
        assert cells[4] == f"{r['wall_us_per_call']} ({r['chain_calls']})"


def test_parse_probe_args_rewrites_the_table_without_a_run(tmp_path, monkeypatch):
    """``--table`` rewrites the markdown of a probe's JSON and returns None (no run); otherwise the parsed options."""
    rows = [dict(date="2026-01-01T00:00Z", device="GPU", jax="0", command="c", mode="none", ctas=1, warpgroups=1,
                 smem_kb=1, kernels=[("k", 1.0)], cupti_us=1.0, chain_calls=2, wall_us_per_call=3.0, output_ok=True)]
    path = tmp_path / "b.json"
    path.write_text(json.dumps(rows))
    monkeypatch.setattr("sys.argv", ["probe", "--table", str(path)])
    assert parse_probe_args(argparse.ArgumentParser(), barrier_probe.write_table) is None
    assert "| none | 1 x 1, 1 | k 1.0 | 1.0 | 3.0 (2) | True |" in (tmp_path / "b.md").read_text()
    monkeypatch.setattr("sys.argv", ["probe", "--out", "x.json"])
    args = parse_probe_args(argparse.ArgumentParser(), barrier_probe.write_table)
    assert args.out == "x.json" and args.table is None
