"""Whole-pipeline GPTQ on a LLaMA-7B-shaped model with random weights, end to end on 1 device and on a mesh of several:
total wall time, compilation, steady time per decoder layer (Hessian collection / solves), peak memory per device.

This times ``jaxquant.quantize_model`` end to end: embedding of the calibration tokens, every jitted layer pass
(Hessian collection with input reuse, the recomputed layer outputs), the solves, moving each layer between host and
device, and all compilation. The weights live in host memory (numpy, as ``from_pretrained(on_host=True)`` loads them)
and only the layer in progress is on the device(s).

Each device count runs in its own fresh process (``--devices 2 1``: 2 devices, then 1), so that each run compiles
everything itself (no program or autotuning result carried over: a like-for-like cold start) and each peak memory is
its own. The child writes its row to the results file as soon as the run ends and, after every decoder layer, a
progress row to ``<out dir>/quant_pipeline_progress_<n>dev.json`` (a run cut short keeps what it measured).

``--layers`` decoder layers are built (default 32, the whole 7B; fewer extrapolate: ``implied_model_seconds``). To
keep host memory and set-up time small the layers take their random weights from ``--distinct-layers`` generated
sets in turn (shapes, hence all timings, are those of the real model).

Compilation: every trace, lowering and XLA compile is timed through ``jax.monitoring``; ``compile_seconds`` is their
sum (compiles in the solve threads overlap, so it can exceed their share of the wall time), and
``top_programs`` lists the slowest XLA compiles by program. ``--compilation-cache DIR`` turns on JAX's persistent
compilation cache (a user option: a second run then loads the programs instead of compiling them); rows say
whether it was on.

Codes: every run writes a digest (sha1 of qweight, qzeros, scales, g_idx) of each decoder layer's quantized weights
and the packed codes of its first and last layer to ``--codes-dir``; at the end the parent compares every run with
the first 1-device run (identical layers, and the fraction of identical 4-bit codes in the first and last layer) and
writes a ``codes_vs_1_device`` row. ``--batch`` is per device (the pipeline's ``batch_size``), so 1 and N devices
compute the same per-device shapes and, with the canonical Hessian shards, the same bits.

    python bench/quant_pipeline.py                           # 7B shapes, 32 layers, all devices then 1
    python bench/quant_pipeline.py --devices 2 1 --layers 8
    CPU smoke test (2 host devices): XLA_FLAGS=--xla_force_host_platform_device_count=2 python bench/quant_pipeline.py \
        --hidden 256 --intermediate 512 --heads 4 --vocab 512 --nsamples 8 --seqlen 64 --batch 4 --layers 3
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def random_llama(args, seed: int = 0):
    import jax
    import numpy as np

    import models

    hf = dict(model_type="llama", vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
              num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
              rms_norm_eps=1e-6, max_position_embeddings=4096, tie_word_embeddings=False)
    family, config, module = models.build(hf, "float32")
    rng = np.random.default_rng(seed)
    abstract = models.abstract_params(module)

    def fill(x):  # LLaMA-like scales: norms ~1, weights ~N(0, 0.02) (in place: no float32 copies)
        a = rng.standard_normal(x.shape, dtype=np.float32)
        if len(x.shape) == 1:
            a *= 0.1
            a += 1.0
        else:
            a *= 0.02
        return a

    distinct = max(1, min(getattr(args, "distinct_layers", args.layers), args.layers))
    pool = [jax.tree_util.tree_map(fill, abstract[f"layers_{i}"]) for i in range(distinct)]
    params = {k: (pool[int(k.split("_")[1]) % distinct] if k.startswith("layers_") else jax.tree_util.tree_map(fill, v))
              for k, v in abstract.items()}
    return models.LoadedModel(family=family, config=config, module=module, params=params, tokenizer=None,
                              hf_config=hf, source="random", dtype=np.float32)


class CompileClock:
    """Sums jax.monitoring's trace / lowering / XLA-compile durations, and XLA compile time per program."""

    EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
              "/jax/core/compile/backend_compile_duration")

    def __init__(self):
        import collections
        import logging
        import re
        import threading

        import jax

        self.total, self.count, self.by_program = 0.0, 0, collections.defaultdict(float)
        self.timeline, self.t0 = [], time.perf_counter()  # [program, finished at (s after t0), seconds, thread]
        self._lock = threading.Lock()

        def on_event(event, duration, **_):
            if event in self.EVENTS:
                with self._lock:
                    self.total += duration
                    self.count += event == self.EVENTS[-1]

        jax.monitoring.register_event_duration_secs_listener(on_event)
        pattern = re.compile(r"Finished XLA compilation of (.*) in ([0-9.eE+-]+) sec")
        clock = self

        class Handler(logging.Handler):
            def emit(self, record):
                m = pattern.match(record.getMessage())
                if m:
                    with clock._lock:
                        clock.by_program[m.group(1)] += float(m.group(2))
                        clock.timeline.append([m.group(1), round(time.perf_counter() - clock.t0, 2),
                                               round(float(m.group(2)), 2), threading.current_thread().name])

        jax.config.update("jax_log_compiles", True)  # only to name the programs: the messages go to the handler
        log = logging.getLogger("jax")
        log.addHandler(Handler())
        log.propagate = False

    def top(self, n=8):
        return {k: round(v, 2) for k, v in sorted(self.by_program.items(), key=lambda kv: -kv[1])[:n]}


def _linears(layer_params):
    """(path, quantized weight) of a decoder layer's quantized linears, in a fixed order."""
    from flax.traverse_util import flatten_dict

    from jaxquant.formats import UniformQuantizedWeight

    flat = flatten_dict(layer_params, is_leaf=lambda _, x: isinstance(x, UniformQuantizedWeight))
    return sorted(("/".join(k), v) for k, v in flat.items() if isinstance(v, UniformQuantizedWeight))


def save_codes(qparams, codes_dir: str, run_id: str, n_layers: int) -> list:
    """Per-layer sha1 of the quantized weights (returned, and written with the packed codes of the first and the
    last layer to ``codes_dir/<run_id>.npz``)."""
    import hashlib

    import numpy as np

    digests, keep = [], {}
    for i in range(n_layers):
        h = hashlib.sha1()
        for name, qw in _linears(qparams[f"layers_{i}"]):
            for f in ("qweight", "qzeros", "scales", "g_idx"):
                h.update(np.ascontiguousarray(np.asarray(getattr(qw, f))).tobytes())
            if i in (0, n_layers - 1):
                keep[f"layers_{i}/{name}"] = np.asarray(qw.qweight)
        digests.append(h.hexdigest())
    os.makedirs(codes_dir, exist_ok=True)
    np.savez(os.path.join(codes_dir, f"{run_id}.npz"), **keep)
    with open(os.path.join(codes_dir, f"{run_id}.json"), "w") as f:
        json.dump({"run_id": run_id, "digests": digests}, f)
    return digests


def compare_codes(codes_dir: str, run_ids: list, bits: int) -> dict:
    """Every run against the first 1-device run: layers with identical digests, and the fraction of identical codes
    (packed ``bits``-bit fields) in the first and last layer."""
    import numpy as np

    runs = {r: json.load(open(os.path.join(codes_dir, f"{r}.json")))["digests"] for r in run_ids}
    hessians = {r: json.load(open(p)) for r in run_ids
                if os.path.exists(p := os.path.join(codes_dir, f"{r}.hessians.json"))}
    ref = next((r for r in run_ids if r.startswith("1dev-")), None)
    if ref is None:
        return {}
    ref_codes = np.load(os.path.join(codes_dir, f"{ref}.npz"))
    out = {}
    for r in run_ids:
        codes = np.load(os.path.join(codes_dir, f"{r}.npz"))
        same = total = 0
        for k in ref_codes.files:
            diff = ref_codes[k].view(np.uint32) ^ codes[k].view(np.uint32)
            fields = 32 // bits
            for j in range(fields):
                same += int(np.count_nonzero(((diff >> (j * bits)) & ((1 << bits) - 1)) == 0))
            total += diff.size * fields
        out[r] = dict(identical_layers=sum(a == b for a, b in zip(runs[r], runs[ref])), layers=len(runs[ref]),
                      identical_code_fraction_first_last_layer=same / total)
        if r in hessians and ref in hessians:
            out[r].update(identical_hessians=sum(a == b for a, b in zip(hessians[r], hessians[ref])),
                          hessians=len(hessians[ref]),
                          first_different_hessian=next((i for i, (a, b) in enumerate(zip(hessians[r], hessians[ref]))
                                                        if a != b), None))
    return dict(reference_run=ref, runs=out)


def record_hessians(on: bool, args):
    """Diagnostics (``--hessian-digests``): wrap GPTQ's row solve to record the sha1 of every Hessian it is given
    (the warm-up solves' identity Hessians left out); returns the list it fills, or None."""
    if not on:
        return None
    import dataclasses
    import hashlib
    import threading

    import numpy as np

    from jaxquant import pipeline

    base, log, lock = pipeline.METHODS["gptq"], [], threading.Lock()
    sha = lambda a: hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest()  # noqa: E731
    identities = {sha(np.eye(k, dtype=np.float32)) for k in {args.hidden, args.intermediate}}

    def solve_rows(W, H, cfg):
        digest = sha(np.asarray(H))
        if digest not in identities:
            with lock:
                log.append(digest)
        return base.solve_rows(W, H, cfg)

    pipeline.METHODS["gptq"] = dataclasses.replace(base, solve_rows=solve_rows)
    return log


def run_one(args, n_dev: int, out: str):
    """One quantize_model run on ``n_dev`` devices in this process; writes progress rows and the final row."""
    t_init = time.perf_counter()
    import jax
    import numpy as np

    if args.compilation_cache:
        # one cache per device count: a 1-device run must not load programs a 2-device run left there
        jax.config.update("jax_compilation_cache_dir", os.path.join(args.compilation_cache, f"{n_dev}dev"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    from jaxquant import results
    from jaxquant.config import QuantConfig
    from jaxquant.distributed import make_mesh
    from jaxquant.pipeline import quantize_model

    if n_dev > jax.device_count():
        raise SystemExit(f"--devices {n_dev}: only {jax.device_count()} devices here")
    devices = jax.devices()[:n_dev]
    init_seconds = time.perf_counter() - t_init
    t_model = time.perf_counter()
    lm = random_llama(args)
    calib = np.random.default_rng(1).integers(0, args.vocab, (args.nsamples, args.seqlen)).astype(np.int32)
    model_seconds = time.perf_counter() - t_model
    cfg = QuantConfig(bits=args.bits, group_size=args.group_size)
    mesh = make_mesh(devices) if n_dev > 1 else None
    cache_dir = args.compilation_cache and os.path.join(args.compilation_cache, f"{n_dev}dev")
    state = {"cache_warm": bool(cache_dir and os.path.isdir(cache_dir) and os.listdir(cache_dir))}
    clock = CompileClock()
    progress_path = os.path.join(os.path.dirname(os.path.abspath(out)), f"quant_pipeline_progress_{n_dev}dev.json")
    per_layer_compile, last = [], [0.0]
    t0 = clock.t0 = time.perf_counter()

    def peaks():
        stats = [d.memory_stats() or {} for d in devices]
        return [None if "peak_bytes_in_use" not in s else round(s["peak_bytes_in_use"] / 2**30, 3) for s in stats]

    def make_row(layer_seconds, report=None, wall=None):
        steady = layer_seconds[1:] or layer_seconds
        per_layer = float(np.median(steady))
        model_layers = args.model_layers or args.layers
        row = dict(
            what="gptq_quantize_model", devices=n_dev, mesh_solves=args.mesh_solves if n_dev > 1 else "-",
            code_version=args.code_version,
            model_shape=dict(hidden=args.hidden, intermediate=args.intermediate, heads=args.heads, vocab=args.vocab,
                             layers_built=args.layers, model_layers=model_layers,
                             distinct_layer_weights=min(args.distinct_layers, args.layers)),
            calib=dict(nsamples=args.nsamples, seqlen=args.seqlen, batch=args.batch),
            config=dict(bits=args.bits, group_size=args.group_size),
            compilation_cache=(("warm" if state["cache_warm"] else "on, empty at start") if args.compilation_cache
                               else "off"),
            layers_done=len(layer_seconds), seconds=wall if wall is not None else time.perf_counter() - t0,
            layer_seconds=[round(s, 4) for s in layer_seconds], seconds_per_layer=per_layer,
            first_layer_extra_s=layer_seconds[0] - per_layer,
            compile_seconds=round(clock.total, 3), compiled_programs=clock.count,
            compile_seconds_per_layer=[round(c, 3) for c in per_layer_compile],
            top_programs=clock.top(), peak_mem_gb=peaks(),
            init_seconds=round(init_seconds, 2), model_build_seconds=round(model_seconds, 2))
        if report is not None:
            steady_rows = [r for r in report.layers if r["layer"] != "layers_0"]
            n_steady = max(len(layer_seconds) - 1, 1)
            row.update(
                steady_collect_seconds_per_layer=sum(r["collect_seconds"] for r in steady_rows) / n_steady,
                steady_solve_seconds_per_layer=sum(r["seconds"] for r in steady_rows) / n_steady,
                setup_seconds=row["seconds"] - sum(layer_seconds),
                phase_seconds={k: round(v, 3) for k, v in getattr(report, "phase_seconds", {}).items()},
                compile_timeline=clock.timeline[:150])
            row["compile_share"] = round(row["compile_seconds"] / row["seconds"], 3)
            if args.layers < model_layers:
                row["implied_model_seconds"] = (row["setup_seconds"] + layer_seconds[0]
                                                + per_layer * (model_layers - 1))
        return results.row("quant_pipeline", **row)

    def on_layer(name, seconds):
        per_layer_compile.append(clock.total - last[0])
        last[0] = clock.total
        state.setdefault("layer_seconds", []).append(seconds)
        row = make_row(state["layer_seconds"])
        row["command"] = os.environ.get("QUANT_PIPELINE_COMMAND", row["command"])
        with open(progress_path + ".tmp", "w") as f:
            json.dump(row, f, indent=1)
        os.replace(progress_path + ".tmp", progress_path)
        print(f"[{n_dev} dev] {name}: {seconds:.2f} s (compile {per_layer_compile[-1]:.1f} s)", flush=True)

    hessian_log = record_hessians(args.hessian_digests, args)
    qparams, report = quantize_model(lm, calib, cfg, method="gptq", batch_size=args.batch, mesh=mesh,
                                     progress=False, mesh_solves=args.mesh_solves, layer_callback=on_layer)
    wall = time.perf_counter() - t0
    row = make_row(report.layer_seconds, report, wall)
    row["run_id"] = f"{n_dev}dev-{os.getpid()}"
    row["layer_code_digests"] = save_codes(qparams, args.codes_dir, row["run_id"], args.layers)
    if hessian_log is not None:  # in solve order; consecutive repeats (row blocks of one solve) counted once
        row["hessian_digests"] = [d for i, d in enumerate(hessian_log) if i == 0 or d != hessian_log[i - 1]]
        with open(os.path.join(args.codes_dir, f"{row['run_id']}.hessians.json"), "w") as f:
            json.dump(row["hessian_digests"], f)
    row["command"] = os.environ.get("QUANT_PIPELINE_COMMAND", row["command"])
    print(json.dumps(row), flush=True)
    results.append_rows(out, [row])  # each row as soon as it is measured


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--distinct-layers", type=int, default=2, help="random weight sets the layers cycle through")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--model-layers", type=int, default=32, help="layers of the full model, for the extrapolation")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8, help="calibration sequences per device and step")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--devices", type=int, nargs="*", default=None,
                    help="device counts, one fresh process each, in this order (default: all, then 1)")
    ap.add_argument("--mesh-solves", default="rows", choices=["linears", "rows"])
    ap.add_argument("--compilation-cache", default=None, help="directory for JAX's persistent compilation cache")
    ap.add_argument("--code-version", default=None, help="label stored in the rows")
    ap.add_argument("--codes-dir", default="/tmp/quant_pipeline_codes",
                    help="per-run code digests and first/last-layer codes, compared at the end")
    ap.add_argument("--hessian-digests", action="store_true",
                    help="diagnostics: record a digest of every Hessian the solves get and compare them too")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    out = args.out or (os.path.join(os.environ["OUT"], "quant_pipeline.json") if os.environ.get("OUT")
                       else "bench/results/quant_pipeline.json")
    if args.child is not None:
        return run_one(args, args.child, out)

    from jaxquant.results import command_line

    counts = args.devices
    if counts is None:  # no JAX in this process (it would hold the GPUs): ask nvidia-smi, else one device
        n_gpu = 0
        if shutil.which("nvidia-smi"):
            q = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
            n_gpu = sum(line.startswith("GPU ") for line in q.stdout.splitlines())
        counts = [n_gpu, 1] if n_gpu > 1 else [1]
    env = dict(os.environ, QUANT_PIPELINE_COMMAND=command_line(), PYTHONUNBUFFERED="1")
    failed = 0
    known = set(os.listdir(args.codes_dir)) if os.path.isdir(args.codes_dir) else set()
    for n in counts:
        child_env = dict(env)
        if shutil.which("nvidia-smi") and "CUDA_VISIBLE_DEVICES" not in os.environ:
            child_env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(n))  # a 1-GPU run holds one GPU
        argv = [a for a in sys.argv[1:]]
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--child", str(n), "--out", out],
                              env=child_env)
        print(f"--- {n} device(s): exit {proc.returncode}, process wall {time.perf_counter() - t:.1f} s", flush=True)
        failed += proc.returncode != 0
    run_ids = sorted({f[:-5] for f in os.listdir(args.codes_dir) if f.endswith(".json") and f.count(".") == 1}
                     - {f[:-5] for f in known},
                     key=lambda r: os.path.getmtime(os.path.join(args.codes_dir, f"{r}.json")))
    if run_ids:
        from jaxquant import results

        comparison = compare_codes(args.codes_dir, run_ids, args.bits)
        print("codes vs 1 device:", json.dumps(comparison), flush=True)
        if comparison:
            row = results.row("quant_pipeline", what="codes_vs_1_device", devices_runs=counts,
                              config=dict(bits=args.bits, group_size=args.group_size), layers_built=args.layers,
                              code_version=args.code_version, **comparison)
            row["command"] = env["QUANT_PIPELINE_COMMAND"]
            results.append_rows(out, [row])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
