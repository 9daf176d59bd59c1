"""bench/pdl_probe.py (CPU): its two kernels lower for CUDA with the PDL instructions where the probe needs them (the
spinning kernel signals its dependents, the pass-through kernel waits only when asked), and its table keeps every
row of every XLA_FLAGS setting."""
import json

import jax
import jax.numpy as jnp
import numpy as np

from bench import pdl_probe
from bench.timing import rewrite_table
from bench.launch_probe import X_SHAPE, passthrough


def _lowered(fn):
    return jax.jit(fn).trace(jnp.ones(X_SHAPE, jnp.bfloat16)).lower(lowering_platforms=("cuda",)).as_text()


def test_probe_kernels_carry_the_pdl_instructions():
    spin = pdl_probe.spin_kernel(7)
    for wait in (False, True):
        text = _lowered(lambda x, wait=wait: passthrough(132, 1, 1, wait=wait)(spin(x)))
        assert text.count("griddepcontrol.launch_dependents") == 1  # A only
        assert text.count("griddepcontrol.wait") == int(wait)  # B, only when asked


def test_table_has_every_row(tmp_path, rng):
    rows = []
    for flags in ("", "--xla_gpu_enable_pdl=true"):
        for iters in (0, int(rng.integers(1, 10**5))):
            for wait in (False, True):
                a, b = (round(float(v), 2) for v in rng.uniform(1, 50, 2))
                rows.append(dict(date="2026-01-01T00:00Z", device="GPU", jax="0", command="c", xla_flags=flags,
                                 marked_uses_pdl=True, spin_iters=iters, wait=wait, spin_us=a, dependent_us=b))
    path = tmp_path / "p.json"
    path.write_text(json.dumps(rows))
    rewrite_table(str(path), pdl_probe.write_table)
    md = (tmp_path / "p.md").read_text()
    table_rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith(("| spin", "| ---"))]
    assert len(table_rows) == len(rows)
    for r, line in zip(rows, table_rows):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells == [str(r["spin_iters"]), str(r["wait"]), str(r["spin_us"]), str(r["dependent_us"])]
    assert np.all([f"XLA_FLAGS `{f}`" in md for f in ("", "--xla_gpu_enable_pdl=true")])
