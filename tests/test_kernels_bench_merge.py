"""bench/kernels.py --merge-cupti and bench/plot_kernels.py row selection (CPU, no GPU work): merging device-time rows
must keep other rows and other sections, replace its own section instead of duplicating it, and the plot must prefer
device-time rows over wall-clock chain rows."""
from __future__ import annotations

import importlib.util
import json
import os

import numpy as np

_BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


def _load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(_BENCH, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


kernels = _load("kernels")
plot_kernels = _load("plot_kernels")

ENV = dict(benchmark="kernels", command="python bench/kernels.py --cupti", device="GPU X", jax="0", jaxlib="0",
           date="2026-01-01")


def _decode_row(rng, fmt, M, timing="cupti-rotating"):
    us = float(rng.uniform(10, 100))
    return dict(ENV, format=fmt, bits=4, group_size=128, sym=False, act_order=False, M=M, K=8192, N=28672, us=us,
                kernel_only_us=us * 0.9, bf16_xla_us=150.0, xla_dequant_us=1000.0, speedup_vs_bf16=150.0 / us,
                kernel_only_speedup_vs_bf16=150.0 / (0.9 * us), speedup_vs_xla_dequant=1000.0 / us, gbps=1.0,
                kernel_only_gbps=1.0, bytes_moved=1, max_rel_err=0.003, fro_rel_err=0.003, correct=True,
                kernel="pallas-mosaic-gpu", timing=timing, gpu_kernels=["k"],
                config=dict(tile_k=512, stages=3, k_splits=2, n_sub=1))


def test_merge_keeps_other_rows_and_sections_and_replaces_its_own(tmp_path, rng):
    chain = _decode_row(rng, "gptq-w4g128", 1, timing="chain")
    other = dict(_decode_row(rng, "squeezellm-w4", 1), kernel="pallas-lut")
    (tmp_path / "kernels.json").write_text(json.dumps([chain, other]))
    (tmp_path / "kernels.md").write_text("# title\n\nother section\n")
    new = [_decode_row(rng, "gptq-w4g128", m) for m in (1, 16)]
    prefill = dict(_decode_row(rng, "gptq-w4g128", 512), bf16_tflops=500.0, kernel="xla-dequant-matmul")
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in new + [prefill]) + "\n")
    kernels.merge_cupti(str(jsonl), str(tmp_path), note="NOTE-ONE")
    kernels.merge_cupti(str(jsonl), str(tmp_path), note="NOTE-TWO")  # same rows again: replaced, not duplicated
    rows = json.loads((tmp_path / "kernels.json").read_text())
    assert len(rows) == 2 + 3
    assert chain in rows and other in rows  # the chain row with the same format / M / shape stays
    md = (tmp_path / "kernels.md").read_text()
    assert md.startswith("# title\n\nother section\n")
    assert md.count(kernels.CUPTI_MD_BEGIN) == 1 and md.count(kernels.CUPTI_MD_END) == 1
    assert "NOTE-TWO" in md and "NOTE-ONE" not in md
    table = md.split("| format | K x N |")[1]
    assert sum(line.startswith("| gptq-w4g128 | 8192x28672 |") for line in table.splitlines()) == 2
    assert "| 8192x28672 | 512 |" in md  # the prefill row lands in its own table


def test_merge_keeps_launch_rows_and_other_dates(tmp_path, rng):
    """A table rerun replaces only its own same-date rows: rows of the launch benchmark (same format, shape, M,
    kernel and timing, plus a launch and a run id) and of earlier dates stay as the history other sections are
    built from; the LUT section shows each row's latest date only."""
    from bench.timing import latest_rows

    launch_row = dict(_decode_row(rng, "gptq-w4g128", 1), launch="auto", run_id="2026-01-01T00:00:00Z")
    older = dict(_decode_row(rng, "gptq-w4g128", 1), date="2025-12-31")
    (tmp_path / "kernels.json").write_text(json.dumps([launch_row, older]))
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text(json.dumps(_decode_row(rng, "gptq-w4g128", 1)) + "\n")
    kernels.merge_cupti(str(jsonl), str(tmp_path))
    kernels.merge_cupti(str(jsonl), str(tmp_path))  # the same date again: replaced
    rows = json.loads((tmp_path / "kernels.json").read_text())
    assert len(rows) == 3 and launch_row in rows and older in rows
    assert latest_rows([older, rows[-1]]) == [rows[-1]]
    assert len(latest_rows([older, dict(older, M=16)])) == 2  # different M: both are the latest of their key


def test_plot_prefers_device_time_rows(rng):
    chain = _decode_row(rng, "gptq-w4g128", 1, timing="chain")
    device = _decode_row(rng, "gptq-w4g128", 1)
    later_chain = _decode_row(rng, "gptq-w4g128", 1, timing="chain")
    only_chain = _decode_row(rng, "gptq-w4g128-sym", 4, timing="chain")
    wrong = dict(_decode_row(rng, "gptq-w3g128", 1), correct=False)
    other_shape = dict(_decode_row(rng, "gptq-w3g128", 1), K=4096)
    config_comparison = dict(_decode_row(rng, "gptq-w4g128", 1), launch="auto")  # bench/kernels_launch.py row
    best = plot_kernels.pick_rows([chain, device, later_chain, only_chain, wrong, other_shape, config_comparison],
                                  8192, 28672)
    assert best["gptq-w4g128"][1] is device
    assert best["gptq-w4g128-sym"][4] is only_chain
    assert "gptq-w3g128" not in best  # an incorrect row is never plotted; another shape is not this plot
    assert np.isfinite(best["gptq-w4g128"][1]["speedup_vs_bf16"])
