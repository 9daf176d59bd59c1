"""SmolLM2-135M float32 WikiText-2 perplexity: jaxquant vs transformers' PyTorch model, same protocol, same machine.

Windows alternate between the two implementations (JAX window i, then torch window i), so both see the same machine
load; seconds per window are medians over the windows after the first (compilation / warm-up).

    python bench/ppl_parity.py [--max-windows N] [--seqlen 2048] [--out bench/results/ppl_parity.json]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import models  # noqa: E402
from jaxquant import data, results  # noqa: E402
from jaxquant.eval import window_losses  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dataset", default="wikitext2")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", default="bench/results/ppl_parity.json")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    lm = models.from_pretrained(args.model)
    gguf = models.weights.find_gguf(lm.source)
    kwargs = {"gguf_file": os.path.basename(gguf)} if gguf else {}
    ref = AutoModelForCausalLM.from_pretrained(lm.source, dtype=torch.float32, **kwargs).eval()

    ids = data.tokenize(lm.tokenizer, data.eval_text(args.dataset))
    seqlen = args.seqlen
    nsamples = ids.size // seqlen
    if args.max_windows:
        nsamples = min(nsamples, args.max_windows)
    jax_nll, torch_nll, jax_s, torch_s = [], [], [], []
    loss_fct = torch.nn.CrossEntropyLoss()
    for i in range(nsamples):
        window = ids[i * seqlen:(i + 1) * seqlen][None]
        t0 = time.perf_counter()
        loss = float(np.asarray(window_losses(lm.module, lm.params, jnp.asarray(window)))[0])
        jax_s.append(time.perf_counter() - t0)
        jax_nll.append(loss * seqlen)
        t0 = time.perf_counter()
        with torch.no_grad():
            batch = torch.from_numpy(window.astype(np.int64))
            logits = ref(batch).logits  # GPTQ reference: CrossEntropyLoss on shifted logits, times seqlen
            tloss = loss_fct(logits[:, :-1, :].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        torch_s.append(time.perf_counter() - t0)
        torch_nll.append(float(tloss.float()) * seqlen)
        print(f"window {i + 1}/{nsamples}: jax {jax_s[-1]:.2f}s torch {torch_s[-1]:.2f}s "
              f"ppl jax {math.exp(sum(jax_nll) / (len(jax_nll) * seqlen)):.4f} "
              f"torch {math.exp(sum(torch_nll) / (len(torch_nll) * seqlen)):.4f}", flush=True)

    def ppl(nll):
        return math.exp(sum(nll) / (nsamples * seqlen))

    steady = slice(1, None) if nsamples > 1 else slice(None)
    row = results.row(
        "ppl_parity", model=args.model, method="fp32", wbits=32, abits=16, dataset=args.dataset, seqlen=seqlen,
        eval_tokens=nsamples * seqlen, nsamples=nsamples, total_tokens=int(ids.size), full_split=args.max_windows is None,
        ppl_jax=ppl(jax_nll), ppl_torch=ppl(torch_nll), rel_diff=abs(ppl(jax_nll) - ppl(torch_nll)) / ppl(torch_nll),
        jax_s_per_window=statistics.median(jax_s[steady]), torch_s_per_window=statistics.median(torch_s[steady]),
        jax_first_window_s=jax_s[0], torch_version=torch.__version__, torch_threads=torch.get_num_threads(),
        transformers=__import__("transformers").__version__)
    print(json.dumps(row, indent=1))
    results.append_rows(args.out, [row], key=("model", "dataset", "seqlen", "full_split", "device"))
    write_markdown(args.out)


def write_markdown(path):
    with open(path) as f:
        rows = json.load(f)
    lines = ["| model | dataset | seqlen | windows | ppl jaxquant | ppl transformers | rel. diff | s/window jax | "
             "s/window torch | device | jax | date |", "|" + "---|" * 12]
    for r in rows:
        lines.append(f"| {r['model']} | {r['dataset']} | {r['seqlen']} | {r['nsamples']} | {r['ppl_jax']:.4f} | "
                     f"{r['ppl_torch']:.4f} | {r['rel_diff']:.2e} | {r['jax_s_per_window']:.2f} | "
                     f"{r['torch_s_per_window']:.2f} | {r['device']} | {r['jax']} | {r['date']} |")
    with open(path.replace(".json", ".md"), "w") as f:
        f.write("\n".join(lines) + "\n\nCommand: see each row's `command` in the JSON file.\n")


if __name__ == "__main__":
    main()
