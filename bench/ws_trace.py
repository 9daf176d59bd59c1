"""Diagnostic (GPU): per-CTA timelines of the warp-specialized kernel, where a call's time goes.

    python bench/ws_trace.py --out bench/results/ws_trace.json [--raw $OUT/ws_trace_raw.json.gz]
    python bench/ws_trace.py --table bench/results/ws_trace.json      # (re)write the markdown only

A worker process builds the kernels with Mosaic GPU's on-device profiler (``JAXQUANT_KERNEL_TRACE_DIR``): each
warpgroup records the global timer when its CTA starts, then the SM's cycle counter at every entry to and exit from
the kernel's named scopes (compute warpgroups: ``prologue``, each pipeline ``step``, ``epilogue``; the TMA
warpgroup: the pipeline's ``Init``). Per call (``--calls`` after one warm-up call) ``summarize_call`` gives the
window (first CTA start to last compute warpgroup end), the spread of the CTAs' starts and ends, the wait for the
first step's blocks, the time per step and between steps (the wait for the next step's blocks), and the share of the
window a compute warpgroup is not running (ncu's "SM active cycles" counts the same idle time). CUPTI times the
traced calls (the profiler's stores slow the kernel about 2x, outside the recorded scopes) and, in a second worker
without tracing, the untraced kernel.

Clock: the events count SM cycles. The workers convert them at ``NOMINAL_GHZ``; ``calibrated_ghz`` rescales to
the clock that makes each case's traced window plus the launch cost of an empty kernel (``--empty-kernel-us``, from
bench/launch_probe.py) equal the untraced kernel's CUPTI time, the median over the cases (it is recorded per case,
and the spread between cases says how well one clock explains them all).
"""
import argparse
import glob
import gzip
import json
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CASES = ("gptq-w4g128:4096x12288,gptq-w4g128:4096x22016,gptq-w4g128:11008x4096,gptq-w4g128:8192x28672,"
         "gptq-w3g128:8192x28672,squeezellm-w4:8192x28672")


def parse_trace(path: str, ghz: float) -> list:
    """One trace file -> per compute warpgroup: dict(cta, sm, wg, start_ns, events=[(name, begin?, ns from start)])."""
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    by_tid: dict = {}
    for e in events:
        by_tid.setdefault(e["tid"], []).append(e)
    out = []
    for tid, evs in by_tid.items():
        t0 = evs[0]["ts"]  # the first event sits at the CTA's global start time (us); later ones add cycles
        start_ns = t0 * 1e3
        out.append(dict(tid=tid, sm=evs[0]["pid"] - 1, start_ns=start_ns,
                        events=[(e["name"], e["ph"] == "B", (e["ts"] - t0) * 1e3 / ghz) for e in evs]))
    return out


def _spans(events, name):
    """[(begin, end)] ns of every outermost ``name`` scope of one warpgroup's events (the lowering re-enters a scope
    inside the conditionals of a step, so scopes nest)."""
    spans, depth, open_at = [], 0, None
    for n, begin, t in events:
        if n != name:
            continue
        if begin:
            depth += 1
            if depth == 1:
                open_at = t
        else:
            depth -= 1
            if depth == 0:
                spans.append((open_at, t))
    return spans


def summarize_call(wgs: list) -> dict:
    """A call's figures (us): the window (first CTA start to last compute warpgroup end), the spread of CTA starts
    and of compute warpgroup ends, and medians over the compute warpgroups (those with pipeline steps; the TMA
    warpgroup records only the pipeline's ``Init``) of the prologue, the wait for the first step's blocks, a step
    (the first excluded), the time between steps and the epilogue; ``idle_share``: the mean share of the window a
    compute warpgroup is not yet or no longer running (ncu's "SM active cycles" counts the same idle time)."""
    starts = [w["start_ns"] for w in wgs]
    t_min = min(starts)
    wgs = [w for w in wgs if _spans(w["events"], "step")]
    ends, prologue, first_wait, step_us, gap_us, epilogue, active = [], [], [], [], [], [], []
    for w in wgs:
        ev = w["events"]
        end = w["start_ns"] + ev[-1][2]
        ends.append(end)
        active.append(ev[-1][2])
        pro = _spans(ev, "prologue")
        steps = _spans(ev, "step")
        epi = _spans(ev, "epilogue")
        if pro:
            prologue.append(pro[0][1] - pro[0][0])
        if pro and steps:
            first_wait.append(steps[0][0] - pro[0][1])
        step_us += [b - a for a, b in steps[1:]]
        gap_us += [steps[i + 1][0] - steps[i][1] for i in range(len(steps) - 1)]
        if epi:
            epilogue.append(epi[0][1] - epi[0][0])
    window = max(ends) - t_min
    q = lambda v, p: sorted(v)[min(len(v) - 1, int(p * len(v)))]  # noqa: E731
    med = lambda v: statistics.median(v) / 1e3 if v else float("nan")  # noqa: E731
    first_step = [w["start_ns"] + _spans(w["events"], "step")[0][0] - t_min for w in wgs]
    return dict(
        window_us=window / 1e3,
        start_spread_us=(max(starts) - t_min) / 1e3,
        first_step_median_us=statistics.median(first_step) / 1e3,
        end_first_us=(min(ends) - t_min) / 1e3, end_median_us=(statistics.median(ends) - t_min) / 1e3,
        end_p90_us=(q(ends, 0.9) - t_min) / 1e3,
        idle_share=1 - statistics.mean(active) / window,
        prologue_us=med(prologue), first_step_wait_us=med(first_wait), step_us=med(step_us),
        between_steps_us=med(gap_us), epilogue_us=med(epilogue),
        steps=max(len(_spans(w["events"], "step")) for w in wgs), compute_warpgroups=len(wgs))


def run_cases(cases: str, calls: int, ghz: float, raw_path: str | None, rounds: int = 5) -> list:
    import jax
    import jax.numpy as jnp

    from bench.decode import random_weight
    from bench.timing import copies, cupti
    from jaxquant.kernel_layout import prepare_for_kernels
    from pallas_kernels import gptq_matmul as gm

    trace_dir = gm.KERNEL_TRACE_DIR
    rows, raw = [], {}
    key = jax.random.PRNGKey(0)
    for case in cases.split(","):
        fmt, shape = case.split(":")
        K, N = map(int, shape.split("x"))
        w = prepare_for_kernels({"w": random_weight(key, fmt, K, N)})["w"]
        xs = [jax.random.normal(k, (1, K), jnp.float32).astype(jnp.bfloat16) for k in jax.random.split(key, 4)]
        sets = list(zip(xs, copies(w, 4)))
        f = jax.jit(lambda x, w: w.matmul(x))
        if trace_dir:
            done = os.path.join(trace_dir, "done")
            os.makedirs(done, exist_ok=True)
            per_call = []
            for i in range(calls + 1):  # call 0 compiles and warms up; a kernel writes one trace file per name,
                x, wi = sets[i % 4]     # so each call's file is moved away before the next call
                jax.block_until_ready(f(x, wi))
                jax.effects_barrier()
                for p in glob.glob(os.path.join(trace_dir, "*-trace.json")):
                    if i:
                        wgs = parse_trace(p, ghz)
                        per_call.append(summarize_call(wgs))
                        raw[case] = wgs
                    os.replace(p, os.path.join(done, f"{i}-{os.path.basename(p)}"))
            row = {k: round(statistics.median(c[k] for c in per_call), 3) for k in per_call[0]} if per_call else {}
            row["calls"] = len(per_call)
        else:
            row = {}
        try:
            total, _, per = cupti(lambda x, w: w.matmul(x), sets, rounds=rounds)
            row.update(cupti_call_us=round(total, 2), cupti_kernels=[(n, round(t, 2)) for n, t in per])
        except Exception as e:  # noqa: BLE001
            row.update(cupti_error=f"{type(e).__name__}: {str(e)[:200]}")
        cfg = repr(gm.KernelConfig().resolved(w, 1))  # GPTQ and LUT weights resolve through the same config
        rows.append(dict(case=case, format=fmt, K=K, N=N, M=1, traced=bool(trace_dir), config=cfg, **row))
        print(json.dumps(rows[-1]), flush=True)
    if raw_path and raw:
        with gzip.open(raw_path, "wt") as fh:
            json.dump(raw, fh)
    return rows


def write_table(rows: list, path: str) -> None:
    cols = ["window_us", "start_spread_us", "prologue_us", "first_step_wait_us", "first_step_median_us", "step_us",
            "between_steps_us", "epilogue_us", "end_first_us", "end_median_us", "end_p90_us", "idle_share", "steps"]
    lines = ["# ws kernel timelines (bench/ws_trace.py)", ""]
    for run in sorted({r.get("date", "") for r in rows}):
        rs = [r for r in rows if r.get("date", "") == run]
        meta = rs[0]
        lines += [f"- {run}: {meta.get('device')}, jax {meta.get('jax')}; command: `{meta.get('command')}`",
                  f"- SM clock {meta.get('sm_ghz')} GHz (per case: {meta.get('sm_ghz_per_case') or 'given'}; empty "
                  f"kernel {meta.get('empty_kernel_us')} us)", ""]
        lines.append("| case | CUPTI traced / untraced us | " + " | ".join(cols) + " |")
        lines.append("| --- | --- | " + " | ".join("---" for _ in cols) + " |")
        plain = {r["case"]: r for r in rs if not r.get("traced")}
        for r in rs:
            if not r.get("traced"):
                continue
            u = plain.get(r["case"], {}).get("cupti_call_us", "-")
            lines.append(f"| {r['case']} | {r.get('cupti_call_us', '-')} / {u} | "
                         + " | ".join(str(r.get(c, "-")) for c in cols) + " |")
        lines.append("")
    with open(os.path.splitext(path)[0] + ".md", "w") as f:
        f.write("\n".join(lines))


def worker_command(mode: str, cases: str, calls: int, raw, rounds: int) -> list:
    return [sys.executable, __file__, "--worker", mode, "--cases", cases, "--calls", str(calls), "--rounds",
            str(rounds)] + (["--raw", raw] if raw and mode == "traced" else [])


NOMINAL_GHZ = 1.8  # the workers' cycles -> ns conversion, before main rescales to the calibrated clock
TIME_FIELDS = ("window_us", "start_spread_us", "first_step_median_us", "end_first_us", "end_median_us",
               "end_p90_us", "prologue_us", "first_step_wait_us", "step_us", "between_steps_us", "epilogue_us")


def calibrated_ghz(rows: list, empty_kernel_us: float) -> tuple:
    """(median clock in GHz, {case: clock}): a case's clock = its traced window's kilocycles (the window in us at
    ``NOMINAL_GHZ`` x that clock) / (its untraced kernel's CUPTI us - the empty kernel's us)."""
    plain = {r["case"]: r for r in rows if not r.get("traced")}
    per_case = {}
    for r in rows:
        u = plain.get(r["case"], {})
        kernel = [t for n, t in u.get("cupti_kernels", []) if "mosaic" in n]
        if r.get("traced") and "window_us" in r and kernel:
            per_case[r["case"]] = round(r["window_us"] * NOMINAL_GHZ / (kernel[0] - empty_kernel_us), 4)
    if not per_case:
        raise RuntimeError("no case has both a trace and an untraced kernel time")
    return statistics.median(per_case.values()), per_case


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cases", default=CASES)
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--sm-ghz", type=float, default=0.0, help="convert at this SM clock (0: ``calibrated_ghz``)")
    ap.add_argument("--empty-kernel-us", type=float, default=1.41,
                    help="CUPTI us of an empty 132-CTA, 3-warpgroup Mosaic kernel (bench/results/launch_probe.md)")
    ap.add_argument("--rounds", type=int, default=5, help="CUPTI rounds per case")
    ap.add_argument("--out")
    ap.add_argument("--raw", help="gzip JSON of the last traced call's per-warpgroup events, per case")
    ap.add_argument("--table")
    ap.add_argument("--worker", choices=("traced", "plain"))
    args = ap.parse_args()
    from bench.timing import rewrite_table, run_meta, save_rows
    if args.table:
        return rewrite_table(args.table, write_table)
    if args.worker:  # trace times at NOMINAL_GHZ (main rescales them)
        rows = run_cases(args.cases, args.calls, NOMINAL_GHZ, args.raw if args.worker == "traced" else None,
                         args.rounds)
        print("ROWS " + json.dumps(rows), flush=True)
        return
    rows = []
    for mode in ("traced", "plain"):
        env = dict(os.environ)
        if mode == "traced":
            env["JAXQUANT_KERNEL_TRACE_DIR"] = tempfile.mkdtemp(prefix="ws_trace_")
        out = subprocess.run(worker_command(mode, args.cases, args.calls, args.raw, args.rounds), env=env,
                             capture_output=True, text=True)
        sys.stderr.write(out.stderr[-4000:])
        for line in out.stdout.splitlines():
            if line.startswith("ROWS "):
                rows += json.loads(line[5:])
            else:
                print(line, flush=True)
    per_case = None
    ghz = args.sm_ghz or None
    if ghz is None:
        ghz, per_case = calibrated_ghz(rows, args.empty_kernel_us)
    for r in rows:  # (the CTAs' start offsets, global-timer ns, are rescaled too: <= 0.13 us apart, a few ns off)
        for k in TIME_FIELDS:
            if k in r:
                r[k] = round(r[k] * NOMINAL_GHZ / ghz, 3)
    print(f"SM clock {ghz:.3f} GHz ({'calibrated: ' + json.dumps(per_case) if per_case else 'given'})", flush=True)
    if args.out and rows:
        meta = dict(run_meta("ws_trace"), sm_ghz=round(ghz, 4), sm_ghz_per_case=per_case,
                    empty_kernel_us=args.empty_kernel_us)
        save_rows([dict(meta, **r) for r in rows], args.out, write_table)


if __name__ == "__main__":
    main()
