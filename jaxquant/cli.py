"""Command line: ``jaxquant eval | generate | quantize``."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time


def load_model(path: str, dtype: str = "float32"):
    """A HF/GGUF model directory, a built-in name, a jaxquant quantized checkpoint directory, or a GPTQ checkpoint
    directory (config.json with quantization_config.quant_method "gptq", e.g. written by ``--export-gptq``)."""
    from jaxquant import checkpoint, gptq_export

    if checkpoint.is_checkpoint(path):
        return checkpoint.load(path)
    if gptq_export.is_gptq_dir(path):
        return gptq_export.load(path, dtype=dtype)
    import models

    return models.from_pretrained(path, dtype=dtype)


def command_line(args) -> str:
    """The command that produced a result row: the argv given to ``main`` (not the caller's ``sys.argv``)."""
    return " ".join(shlex.quote(a) for a in ["jaxquant", *args.argv])


def cmd_eval(args) -> dict:
    from jaxquant import data, eval as ev, results

    t0 = time.perf_counter()
    lm = load_model(args.model, args.dtype)
    load_s = time.perf_counter() - t0
    if lm.tokenizer is None:
        raise SystemExit(f"{args.model} has no tokenizer files; cannot tokenize the evaluation text")
    ids = data.tokenize(lm.tokenizer, data.eval_text(args.dataset, args.data_dir))
    out = ev.perplexity(lm.module, lm.params, ids, seqlen=args.seqlen, batch_size=args.batch_size,
                        max_windows=args.max_windows)
    meta = getattr(lm, "quant_meta", None) or {"method": "fp32" if args.dtype == "float32" else args.dtype}
    row = results.row("perplexity", command=command_line(args), model=args.model, dataset=args.dataset,
                      dtype=args.dtype, load_seconds=load_s, **meta, **out)
    print(json.dumps(row, indent=1))
    if args.out:
        results.append_rows(args.out, [row])
    return row


def cmd_generate(args) -> list:
    from models.generate import generate

    lm = load_model(args.model, args.dtype)
    tok = lm.tokenizer
    if tok is None:
        raise SystemExit(f"{args.model} has no tokenizer files; cannot tokenize the prompts")
    texts = args.prompt
    if args.chat and getattr(tok, "chat_template", None):
        texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                 for p in texts]
    prompts = [tok(t)["input_ids"] for t in texts]
    params = kernel_params(lm, args.kernels, args.dtype)
    t0 = time.perf_counter()
    outs = generate(lm.module, params, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_p=args.top_p, seed=args.seed, eos_id=tok.eos_token_id,
                    pad_id=tok.pad_token_id if tok.pad_token_id is not None else 0)
    dt = time.perf_counter() - t0
    for text, out in zip(args.prompt, outs):
        print(f"### {text}\n{tok.decode(out, skip_special_tokens=True)}\n")
    print(f"[{sum(map(len, outs))} tokens in {dt:.2f} s, compile included]", file=sys.stderr)
    return outs


def kernel_params(lm, mode: str, dtype: str):
    """The parameters generation runs with. ``mode`` "on": quantized linears in the Pallas kernels' layouts (LLaMA
    q/k/v and gate/up fused first, so a layer makes 4 kernel calls instead of 7); "off": as loaded (dequantize-then-
    matmul reference); "auto": "on" on a GPU with bfloat16/float16 activations (the kernels' input dtypes), else "off".
    On the CPU the kernel layouts run through their jnp references, so "on" is also how to check the conversion."""
    import jax
    import jax.numpy as jnp

    if mode == "auto":
        mode = "on" if jax.default_backend() == "gpu" and dtype in ("bfloat16", "float16") else "off"
    if mode == "off":
        return lm.params
    if dtype not in ("bfloat16", "float16"):
        raise SystemExit(f"--kernels on needs --dtype bfloat16 or float16 (the kernels' activation dtypes), not {dtype}")
    from jaxquant.fusion import FUSION_GROUPS, fuse_projections
    from jaxquant.kernel_layout import prepare_for_kernels

    params = lm.params
    family = getattr(lm.config, "family", None)
    if family in FUSION_GROUPS:
        params, report = fuse_projections(params, family)
        for path, reason in report["skipped"].items():
            print(f"[kernels] {path}: not fused ({reason})", file=sys.stderr)
    return prepare_for_kernels(params, jnp.bfloat16 if dtype == "bfloat16" else jnp.float16)


_SPQR_ONLY = ("qq_scale_bits", "qq_zero_bits", "qq_groupsize", "outlier_threshold", "simplified_outliers",
              "round_zero")


def _default(value, default):
    return default if value is None else value


def _spqr_config(args):
    """SpQRConfig from the command line; shared options left unset take SpQR's defaults (the README recipe)."""
    from jaxquant.spqr import SpQRConfig

    for flag, given in (("--sym", args.sym), ("--static-groups", args.static_groups),
                        ("--export-gptq", args.export_gptq)):
        if given:
            raise SystemExit(f"{flag} is not supported with --method spqr")
    base = SpQRConfig()
    fields = dict(bits=args.bits, group_size=args.group_size, act_order=args.act_order, percdamp=args.percdamp,
                  block_size=args.block_size, true_sequential=args.true_sequential,
                  qq_scale_bits=args.qq_scale_bits, qq_zero_bits=args.qq_zero_bits, qq_groupsize=args.qq_groupsize,
                  outlier_relative_threshold=args.outlier_threshold, simplified_outliers=args.simplified_outliers,
                  round_zero=args.round_zero)
    try:
        return SpQRConfig(**{k: _default(v, getattr(base, k)) for k, v in fields.items()})
    except ValueError as err:
        raise SystemExit(f"invalid SpQR settings: {err}") from err


_SQUEEZELLM_ONLY = ("sparsity", "sensitive_pct", "fisher_batch_size")
_RPTQ_ONLY = ("abits", "kv_only", "no_reorder")


def _squeezellm_config(args):
    """SqueezeLLMConfig from the command line: --bits 3|4, --sparsity P (percent kept in float16, the paper's split:
    min(P, --sensitive-pct) by Fisher, the rest by magnitude)."""
    from jaxquant.squeezellm import PAPER_SENSITIVE_PCT, SqueezeLLMConfig

    for flag, given in (("--group-size", args.group_size is not None), ("--sym", args.sym),
                        ("--act-order", args.act_order), ("--static-groups", args.static_groups),
                        ("--percdamp", args.percdamp is not None), ("--export-gptq", args.export_gptq)):
        if given:
            raise SystemExit(f"{flag} is not supported with --method squeezellm")
    try:
        return SqueezeLLMConfig.from_sparsity(args.bits, _default(args.sparsity, 0.0),
                                              sensitive_pct=_default(args.sensitive_pct, PAPER_SENSITIVE_PCT),
                                              fisher_batch_size=_default(args.fisher_batch_size, 1))
    except ValueError as err:
        raise SystemExit(f"invalid SqueezeLLM settings: {err}") from err


def cmd_quantize(args):
    import models
    from jaxquant import checkpoint, data
    from jaxquant.config import QuantConfig
    from jaxquant.pipeline import METHODS, quantize_model

    if args.method != "spqr":
        given = [k for k in _SPQR_ONLY if getattr(args, k) is not None]
        if given:
            raise SystemExit(f"--{given[0].replace('_', '-')} applies to --method spqr only")
    if args.method != "squeezellm":
        given = [k for k in _SQUEEZELLM_ONLY if getattr(args, k) is not None]
        if given:
            raise SystemExit(f"--{given[0].replace('_', '-')} applies to --method squeezellm only")
    if args.method != "rptq":
        given = [k for k in _RPTQ_ONLY if getattr(args, k) is not None]
        if given:
            raise SystemExit(f"--{given[0].replace('_', '-')} applies to --method rptq only")
    elif args.devices != "1" or args.export_gptq:
        raise SystemExit("--method rptq runs on one device and has no GPTQ export (its weights are permuted)")
    if args.method not in METHODS and args.method != "rptq":
        raise SystemExit(f"unknown --method {args.method!r}; available: {', '.join(sorted([*METHODS, 'rptq']))}")
    rptq_config = None
    if args.method == "rptq":  # weights: per-channel asymmetric GPTQ unless --group-size says otherwise
        from jaxquant.rptq import RPTQConfig

        config = QuantConfig(
            bits=args.bits, group_size=_default(args.group_size, -1), sym=args.sym,
            act_order=_default(args.act_order, False), static_groups=args.static_groups, block_size=args.block_size,
            percdamp=_default(args.percdamp, 0.01), true_sequential=args.true_sequential)
        try:
            rptq_config = RPTQConfig(config, abits=_default(args.abits, 16), kv_only=bool(args.kv_only),
                                     reorder=not args.no_reorder)
            from jaxquant.rptq import activation_bits

            activation_bits(rptq_config.abits, rptq_config.kv_only)
        except ValueError as err:
            raise SystemExit(f"invalid RPTQ settings: {err}") from err
    elif args.method == "squeezellm":
        config = _squeezellm_config(args)
    else:
        config = _spqr_config(args) if args.method == "spqr" else QuantConfig(
            bits=args.bits, group_size=_default(args.group_size, 128), sym=args.sym,
            act_order=_default(args.act_order, False), static_groups=args.static_groups, block_size=args.block_size,
            percdamp=_default(args.percdamp, 0.01), true_sequential=args.true_sequential)
    out = os.path.abspath(args.out)
    if os.path.exists(out) and os.listdir(out) and not args.overwrite:
        raise SystemExit(f"--out {out} exists and is not empty (pass --overwrite to replace it)")
    if args.export_gptq:
        export_dir = os.path.abspath(args.export_gptq)
        if export_dir == out:
            raise SystemExit("--export-gptq must be another directory than --out")
        if os.path.exists(export_dir) and os.listdir(export_dir) and not args.overwrite:
            raise SystemExit(f"--export-gptq {export_dir} exists and is not empty (pass --overwrite to replace it)")
    mesh = None
    if args.devices != "1":
        import jax

        from jaxquant.distributed import make_mesh

        n_all = jax.device_count()
        n_dev = n_all if args.devices == "all" else int(args.devices)
        if not 1 <= n_dev <= n_all:
            raise SystemExit(f"--devices {args.devices}: {n_all} device(s) available")
        mesh = make_mesh(jax.devices()[:n_dev]) if n_dev > 1 else None
    # Weights stay in host memory; the pipeline moves one decoder layer at a time to the device(s).
    lm = models.from_pretrained(args.model, dtype=args.dtype, on_host=args.stream_layers)
    calib = None
    if args.method == "rptq" or METHODS[args.method].needs_calibration:
        calib = data.calibration_windows(lm.tokenizer, n=args.nsamples, seqlen=args.seqlen, seed=args.seed,
                                         source=args.calib, directory=args.data_dir)
    t0 = time.perf_counter()
    if rptq_config is not None:
        from jaxquant import rptq

        params, state, report = rptq.quantize_model_rptq(lm, calib, rptq_config, batch_size=args.batch_size,
                                                         progress=True)
    else:
        params, report = quantize_model(lm, calib, config, method=args.method, batch_size=args.batch_size,
                                        reuse_inputs=args.reuse_inputs, mesh=mesh, hessian_shards=args.hessian_shards)
    wall = time.perf_counter() - t0
    calib_info = {"source": args.calib, "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": args.seed} \
        if calib is not None else None
    extra = {"calib": calib_info, "quant_wall_s": wall, "model": args.model}
    if rptq_config is not None:
        rptq.save_rptq(out, params, state, lm, rptq_config, report, extra=extra, overwrite=args.overwrite)
        config = {**dataclasses.asdict(config), "abits": rptq_config.abits, "kv_only": rptq_config.kv_only,
                  "reorder": rptq_config.reorder}
    else:
        checkpoint.save(out, params, lm, args.method, config, report, overwrite=args.overwrite, extra=extra)
    print(json.dumps({"out": out, "method": args.method, "quant_wall_s": round(wall, 2),
                      "total_error": report.total_error(), "devices": report.devices,
                      "peak_device_gb": None if report.peak_device_bytes is None else
                      round(report.peak_device_bytes / 2**30, 3),
                      **(config if isinstance(config, dict) else dataclasses.asdict(config))}, indent=1))
    if args.export_gptq:
        from jaxquant import gptq_export

        gptq_export.export(args.export_gptq, params, lm, config, overwrite=args.overwrite)
    return out


DETERMINISTIC_GPU_FLAG = "--xla_gpu_deterministic_ops=true"


def with_deterministic_gpu_ops(xla_flags: str) -> str:
    """``xla_flags`` with XLA's deterministic GPU ops switched on (kept as given if the user already set the flag).
    XLA otherwise picks GEMM kernels by timing them at compile time, so two compilations of one program (a 1-GPU
    and a 2-GPU run, or two processes) can round differently and GPTQ's codes drift apart over the layers."""
    if "xla_gpu_deterministic_ops" in xla_flags:
        return xla_flags
    return f"{xla_flags} {DETERMINISTIC_GPU_FLAG}".strip()


def main(argv=None):
    parser = argparse.ArgumentParser(prog="jaxquant", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def model_args(p):
        p.add_argument("--model", default="smollm2-135m",
                       help="HF/GGUF model directory, hub id, built-in name (smollm2-135m) or jaxquant checkpoint")
        p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])

    p = sub.add_parser("eval", help="perplexity by the GPTQ protocol")
    model_args(p)
    p.add_argument("--dataset", default="wikitext2", help="wikitext2 | ptb | c4-heldout | path to a text file")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows (a slice)")
    p.add_argument("--data-dir", default=None, help="folder with the data files (default: $JAXQUANT_DATA or "
                                                    "../shared/data beside the checkout)")
    p.add_argument("--out", default=None, help="append the result row to this JSON file")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("generate", help="greedy or top-p generation with a KV cache")
    model_args(p)
    p.add_argument("--prompt", action="append", required=True, help="repeat for a batch of prompts")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    p.add_argument("--kernels", default="auto", choices=["auto", "on", "off"],
                   help="quantized linears through the Pallas kernels (fused q/k/v, gate/up); auto: on a GPU with "
                        "--dtype bfloat16/float16")
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("quantize", help="quantize a model layer by layer and save an orbax checkpoint")
    model_args(p)
    p.add_argument("--method", default="gptq", help="rtn | gptq | spqr | squeezellm | rptq")
    p.add_argument("--bits", "--wbits", dest="bits", type=int, default=4, help="weight bits")
    p.add_argument("--abits", type=int, default=None, help="rptq: activation bits (default 16: none quantized)")
    p.add_argument("--kv-only", action="store_const", const=True, default=None,
                   help="rptq: quantize only the key/value cache at --abits")
    p.add_argument("--no-reorder", action="store_const", const=True, default=None,
                   help="rptq: ablation without reordering (one scale per activation tensor)")
    p.add_argument("--group-size", type=int, default=None,
                   help="input columns per group; -1 = one scale per output channel (default 128; spqr: 16)")
    p.add_argument("--sym", action="store_true", help="symmetric grid (default asymmetric)")
    p.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None,
                   help="columns by decreasing Hessian diagonal (default: off; spqr: on)")
    p.add_argument("--static-groups", action="store_true", help="GPTQ: group parameters fixed before the solve")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--percdamp", type=float, default=None,
                   help="damping as a fraction of the mean Hessian diagonal (default 0.01; spqr: 1.0)")
    p.add_argument("--qq-scale-bits", type=int, default=None, help="spqr: bits of the group scales (default 3)")
    p.add_argument("--qq-zero-bits", type=int, default=None, help="spqr: bits of the group zero points (default 3)")
    p.add_argument("--qq-groupsize", type=int, default=None,
                   help="spqr: output rows sharing a second-level scale and zero (default 16)")
    p.add_argument("--outlier-threshold", type=float, default=None,
                   help="spqr: outlier threshold relative to the layer's mean error (default 0.2; inf = none)")
    p.add_argument("--simplified-outliers", action="store_const", const=True, default=None,
                   help="spqr: skip the leave-one-out pass when fitting group statistics")
    p.add_argument("--round-zero", action="store_const", const=True, default=None,
                   help="spqr: integer zero points before their second-level quantization")
    p.add_argument("--sparsity", type=float, default=None,
                   help="squeezellm: percent of the weights kept in float16 (paper: 0, 0.05, 0.45; default 0)")
    p.add_argument("--sensitive-pct", type=float, default=None,
                   help="squeezellm: of --sparsity, the percent chosen by Fisher value (default 0.05); the rest "
                        "are outliers by magnitude")
    p.add_argument("--fisher-batch-size", type=int, default=None,
                   help="squeezellm: samples per Fisher gradient computation (memory: that many gradient copies; "
                        "default 1)")
    p.add_argument("--no-true-sequential", dest="true_sequential", action="store_false")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calib", default="c4", help="c4 (first 900 documents of the C4 file) | wikitext2 | text file")
    p.add_argument("--batch-size", type=int, default=4, help="calibration windows per device and forward pass")
    p.add_argument("--hessian-shards", type=int, default=None,
                   help="canonical calibration shards whose Hessians are summed in one fixed tree (a power of two; "
                        "default 8 where nsamples allows): results are bit-identical on any device count dividing it")
    p.add_argument("--no-reuse-inputs", dest="reuse_inputs", action="store_false",
                   help="recompute whole layers in every pass instead of feeding quantized groups their stored "
                        "inputs (less memory, about twice the compute)")
    p.add_argument("--devices", default="1", help="devices to spread the work over: N or 'all' (calibration shards "
                   "split across them, Hessians combined in a fixed order, GPTQ solves split by output rows)")
    p.add_argument("--stream-layers", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the model in host memory and move one decoder layer at a time to the device(s)")
    p.add_argument("--gpu-deterministic", action=argparse.BooleanOptionalAction, default=True,
                   help="XLA_FLAGS += --xla_gpu_deterministic_ops=true (no GEMM autotuning): the same codes on 1 or "
                        "N GPUs and from run to run; measured at 7B on H200s it also compiled faster than the default")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", required=True, help="output checkpoint directory (must not exist or be empty)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--export-gptq", default=None, help="also write a GPTQ safetensors directory here")
    p.set_defaults(fn=cmd_quantize)

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    if getattr(args, "gpu_deterministic", False):
        # Read when JAX first initialises its backends, which no code path above has done yet.
        os.environ["XLA_FLAGS"] = with_deterministic_gpu_ops(os.environ.get("XLA_FLAGS", ""))
    args.fn(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
