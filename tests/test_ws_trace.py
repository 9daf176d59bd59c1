"""bench/ws_trace.py's trace reading (CPU): a synthetic Mosaic GPU profiler dump with known timelines must give back
the timelines' figures, and the clock calibration must recover the clock the dump was written at."""
import json
import statistics

import numpy as np
import pytest

from bench import ws_trace


def _dump(path, ctas, rng, ghz):
    """A trace file in the layout Mosaic GPU's ProfilerSpec.dump writes (ts = (global start ns + cycles since the
    warpgroup's first event) / 1e3), and the true per-warpgroup timelines in ns."""
    events, truth = [], []
    for cta in range(ctas):
        start = 1_000_000.0 + rng.uniform(0, 150)
        tid0 = 1 + 3 * cta
        init_end = rng.uniform(80, 150)
        for wg in range(3):
            times = [("Init", True, 0.0), ("Init", False, init_end)]
            if wg < 2:  # compute warpgroups: prologue, steps (a step's conditionals re-enter the scope), epilogue
                t = init_end + rng.uniform(100, 300)
                pro = (t, t + rng.uniform(50, 150))
                times += [("prologue", True, pro[0]), ("prologue", False, pro[1])]
                t = pro[1] + rng.uniform(1000, 2000)
                steps = []
                for _ in range(int(rng.integers(4, 9))):
                    dur = rng.uniform(400, 800)
                    times += [("step", True, t), ("step", True, t + 10), ("step", False, t + dur - 10),
                              ("step", False, t + dur)]
                    steps.append((t, t + dur))
                    t += dur + rng.uniform(50, 120)
                epi = (t, t + rng.uniform(5, 30))
                times += [("epilogue", True, epi[0]), ("epilogue", False, epi[1])]
                truth.append(dict(start=start, pro=pro, steps=steps, epi=epi))
            for name, begin, t_ns in times:
                events.append(dict(name=name, ph="B" if begin else "E", ts=(start + t_ns * ghz) / 1e3,
                                   pid=1 + cta, tid=tid0 + wg))
    with open(path, "w") as f:
        json.dump({"displayTimeUnit": "ns", "traceEvents": events}, f)
    return truth


def test_summarize_call_recovers_the_timelines(tmp_path):
    rng = np.random.default_rng()
    ghz = float(rng.uniform(1.5, 2.0))
    truth = _dump(tmp_path / "t.json", int(rng.integers(2, 6)), rng, ghz)
    wgs = ws_trace.parse_trace(str(tmp_path / "t.json"), ghz)
    got = ws_trace.summarize_call(wgs)

    t0 = min(w["start"] for w in truth)
    ends = [w["start"] + w["epi"][1] for w in truth]
    step_durs = [b - a for w in truth for a, b in w["steps"][1:]]
    gaps = [w["steps"][i + 1][0] - w["steps"][i][1] for w in truth for i in range(len(w["steps"]) - 1)]
    expect = dict(
        window_us=(max(ends) - t0) / 1e3,
        start_spread_us=(max(w["start"] for w in truth) - t0) / 1e3,
        first_step_median_us=statistics.median(w["start"] + w["steps"][0][0] - t0 for w in truth) / 1e3,
        end_median_us=(statistics.median(ends) - t0) / 1e3,
        prologue_us=statistics.median(w["pro"][1] - w["pro"][0] for w in truth) / 1e3,
        first_step_wait_us=statistics.median(w["steps"][0][0] - w["pro"][1] for w in truth) / 1e3,
        step_us=statistics.median(step_durs) / 1e3,
        between_steps_us=statistics.median(gaps) / 1e3,
        epilogue_us=statistics.median(w["epi"][1] - w["epi"][0] for w in truth) / 1e3,
        idle_share=1 - statistics.mean(w["epi"][1] for w in truth) / (max(ends) - t0),
    )
    for key, value in expect.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-6), key
    assert got["steps"] == max(len(w["steps"]) for w in truth)
    assert got["compute_warpgroups"] == len(truth)  # the TMA warpgroups (Init only) are left out


def test_calibrated_ghz_recovers_the_clock():
    rng = np.random.default_rng()
    true_ghz, empty = float(rng.uniform(1.6, 2.0)), float(rng.uniform(1.0, 1.6))
    rows = []
    for case in ("a:1x1", "b:2x2", "c:3x3"):
        kilocycles = float(rng.uniform(10, 100))
        rows.append(dict(case=case, traced=True, window_us=kilocycles / ws_trace.NOMINAL_GHZ))
        rows.append(dict(case=case, traced=False,
                         cupti_kernels=[["gptq_w4_ws_mosaic_gpu_kernel", kilocycles / true_ghz + empty],
                                        ["loop_slice_fusion", 1.3]]))
    ghz, per_case = ws_trace.calibrated_ghz(rows, empty)
    assert ghz == pytest.approx(true_ghz, rel=1e-3)
    assert set(per_case) == {"a:1x1", "b:2x2", "c:3x3"}
    with pytest.raises(RuntimeError, match="no case"):
        ws_trace.calibrated_ghz([r for r in rows if r["traced"]], empty)
