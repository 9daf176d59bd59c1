"""Command line: ``jaxquant eval | generate | quantize``."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def load_model(path: str, dtype: str = "float32"):
    """A HF/GGUF model directory, a built-in name, or a jaxquant quantized checkpoint directory."""
    from jaxquant import checkpoint

    if checkpoint.is_checkpoint(path):
        return checkpoint.load(path)
    import models

    return models.from_pretrained(path, dtype=dtype)


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
    row = results.row("perplexity", model=args.model, dataset=args.dataset, dtype=args.dtype,
                      load_seconds=load_s, **meta, **out)
    print(json.dumps(row, indent=1))
    if args.out:
        results.append_rows(args.out, [row])
    return row


def cmd_generate(args) -> list:
    from models.generate import generate

    lm = load_model(args.model, args.dtype)
    tok = lm.tokenizer
    texts = args.prompt
    if args.chat and getattr(tok, "chat_template", None):
        texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                 for p in texts]
    prompts = [tok(t)["input_ids"] for t in texts]
    t0 = time.perf_counter()
    outs = generate(lm.module, lm.params, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_p=args.top_p, seed=args.seed, eos_id=tok.eos_token_id,
                    pad_id=tok.pad_token_id if tok.pad_token_id is not None else 0)
    dt = time.perf_counter() - t0
    for text, out in zip(args.prompt, outs):
        print(f"### {text}\n{tok.decode(out, skip_special_tokens=True)}\n")
    print(f"[{sum(map(len, outs))} tokens in {dt:.2f} s, compile included]", file=sys.stderr)
    return outs


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
    p.set_defaults(fn=cmd_generate)

    try:
        from jaxquant import quantize_cli
    except ImportError:
        quantize_cli = None
    if quantize_cli is not None:
        quantize_cli.add_parser(sub)

    args = parser.parse_args(argv)
    args.fn(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
