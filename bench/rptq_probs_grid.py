"""What RPTQ's fixed probability grid alone costs: the W4A16 RPTQ model with and without the attention
probabilities on the reference's ``round(p * 255) / 255`` grid (``rptq.fake_quant_probs``), nothing else quantized.

The W4A8 and W4A4 configurations quantize the probabilities on that grid (as the reference's main.py does); in a
2048-token window most probabilities are below 1/510 and round to 0. This isolates that effect from the calibrated
activation quantizers. Reads the checkpoint ``bench/quality.py`` writes for ``rptq-W4A16``; evaluates the first
``--windows`` WikiText-2 windows (GPTQ protocol, seqlen 2048) both ways in one process.

    python bench/quality.py --only rptq-W4A16 --datasets wikitext2   # makes runs/quality/rptq-W4A16
    python bench/rptq_probs_grid.py --windows 16
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxquant import checkpoint, data, results, rptq  # noqa: E402
from jaxquant.eval import perplexity  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "rptq_probs_grid.json")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=os.path.join("runs", "quality", "rptq-W4A16"))
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args()
    lm = checkpoint.load(args.checkpoint)
    if getattr(lm, "rptq_state", None) is None or any(b < 16 for b in lm.rptq_state.bits.values()):
        raise SystemExit(f"{args.checkpoint} is not a W4A16 RPTQ checkpoint (no activation may be quantized)")
    module, params = lm.rptq_model
    if lm.tokenizer is None:
        raise SystemExit(f"{args.checkpoint} carries no tokenizer files")
    ids = data.tokenize(lm.tokenizer, data.eval_text("wikitext2"))  # the checkpoint's own copy of the tokenizer
    rows = []
    for probs_bits in (16, 8):
        bits = {a: 16 for a in rptq.ACTIVATIONS}
        bits["probs"] = probs_bits
        state = rptq.RPTQState(bits, {}, lm.rptq_state.attention,
                               [{"linear": {}, "attention": {}} for _ in lm.rptq_state.layers], [])
        t0 = time.perf_counter()
        out = perplexity(*rptq.act_quantized(module, params, state), ids, seqlen=2048, max_windows=args.windows,
                         progress=False)
        rows.append(results.row("rptq_probs_grid", checkpoint=args.checkpoint, probs_grid=probs_bits < 16,
                                dataset="wikitext2", windows=args.windows, eval_tokens=out["eval_tokens"],
                                ppl=out["ppl"], seconds=time.perf_counter() - t0))
        print(rows[-1], flush=True)
    results.append_rows(args.out, rows, key=("checkpoint", "probs_grid", "windows"))


if __name__ == "__main__":
    main()
