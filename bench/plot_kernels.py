"""Plot of bench/results/kernels.json: speedup over the bf16 XLA matmul (same run) by format and M, one shape.

    python bench/plot_kernels.py                  # 8192x28672 -> bench/results/kernels.png
    python bench/plot_kernels.py --shape 4096x11008 --out /tmp/k.png

Per (format, M) it takes the main tables' rows (bench/kernels.py, kernels_lut.py, kernels_spqr.py; not the config
comparisons of bench/kernels_launch.py): the device-time row (``timing`` containing "cupti") when there is one, else
the wall-clock chain row (hatched bars: they include ~20-30 us of host dispatch per call and understate the speedup), the last such
row in the file; rows marked ``correct: false`` are left out. Needs matplotlib (not a project dependency).
"""
from __future__ import annotations

import argparse
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def pick_rows(rows, K, N, ms=(1, 4, 16, 64)):
    """{format: {M: row}} for the benchmark's M values: device-time rows preferred over chain rows, later rows over
    earlier ones."""
    best = {}
    for r in rows:
        if r.get("K") != K or r.get("N") != N or r.get("M") not in ms or r.get("speedup_vs_bf16") is None:
            continue
        if r.get("correct") is False:
            continue
        if r.get("launch") is not None:  # bench/kernels_launch.py rows (config comparisons): only the main tables
            continue
        device = "cupti" in str(r.get("timing", ""))
        slot = best.setdefault(r["format"], {})
        old = slot.get(r["M"])
        if old is None or device or "cupti" not in str(old.get("timing", "")):
            slot[r["M"]] = r
    return best


def plot(rows, K, N, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = pick_rows(rows, K, N)
    formats = sorted(best)
    ms = sorted({m for per in best.values() for m in per})
    fig, ax = plt.subplots(figsize=(min(14, max(7, 0.35 * len(ms) * len(formats) + 2)), 5))
    width = 0.8 / max(1, len(formats))
    for i, fmt in enumerate(formats):
        for j, m in enumerate(ms):
            r = best[fmt].get(m)
            if r is None:
                continue
            device = "cupti" in str(r.get("timing", ""))
            x = j + (i - (len(formats) - 1) / 2) * width
            ax.bar(x, r["speedup_vs_bf16"], width, color=f"C{i}", hatch=None if device else "//",
                   label=fmt if j == min(k for k, mm in enumerate(ms) if mm in best[fmt]) else None)
            ax.text(x, r["speedup_vs_bf16"] + 0.03, f"{r['speedup_vs_bf16']:.2f}", ha="center", va="bottom",
                    fontsize=6, rotation=90)
    ax.axhline(1.0, color="k", lw=0.8)
    top = max(r["speedup_vs_bf16"] for per in best.values() for r in per.values())
    ax.set_ylim(0, top * 1.35)
    ax.set_xticks(range(len(ms)), [f"M={m}" for m in ms])
    ax.set_ylabel("speedup vs bf16 XLA matmul (same run)")
    devices = sorted({r.get("device", "?") for per in best.values() for r in per.values()})
    ax.set_title(f"{K}x{N} dequant-matmul kernels, {', '.join(devices)}\n"
                 "solid: GPU device time (CUPTI); hatched: wall-clock chain", fontsize=9)
    ax.legend(fontsize=7, ncol=min(5, len(formats)), loc="upper center")
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=os.path.join(HERE, "results", "kernels.json"))
    ap.add_argument("--shape", default="8192x28672")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "kernels.png"))
    args = ap.parse_args()
    K, N = (int(v) for v in args.shape.split("x"))
    with open(args.json) as f:
        rows = json.load(f)
    best = plot(rows, K, N, args.out)
    for fmt, per in sorted(best.items()):
        print(fmt, {m: (r["speedup_vs_bf16"], r.get("timing")) for m, r in sorted(per.items())})


if __name__ == "__main__":
    main()
