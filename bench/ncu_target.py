"""A short program for Nsight Compute: one kernel path at M = 1 on one shape (default config), called three times.

    ncu --clock-control none --kernel-name regex:mosaic --launch-skip 1 --launch-count 1 \
        --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats \
        --section SchedulerStats --section MemoryWorkloadAnalysis python bench/ncu_target.py 4096x22016 [gptq-w3g128]
    # pipe utilization and the SASS with per-instruction counts:
    ncu ... --section ComputeWorkloadAnalysis --section InstructionStats --section SourceCounters \
        --page source --print-source sass python bench/ncu_target.py 8192x28672 lut4

Formats: the names of bench/kernels_launch.py (gptq-w4g128, gptq-w3g128, lut4, lut3, ...). Reports from the H100:
bench/results/ncu/ (bench/NOTES_kernels.md).
"""
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.kernels_launch import Format  # noqa: E402


def main():
    K, N = (int(v) for v in sys.argv[1].split("x"))
    fmt = Format(sys.argv[2] if len(sys.argv) > 2 else "gptq-w4g128")
    kw, _ = fmt.make(0, K, N)
    x = jax.random.normal(jax.random.PRNGKey(1), (1, K), jnp.float32).astype(jnp.bfloat16)
    f = jax.jit(lambda x, w: fmt.call(x, w, fmt.config()))
    for _ in range(3):
        y = f(x, kw).block_until_ready()
    print("done", y.shape)


if __name__ == "__main__":
    main()
