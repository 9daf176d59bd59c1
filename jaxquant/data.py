"""Evaluation text and calibration windows.

Local files come first (``--data-dir``, ``$JAXQUANT_DATA``, or ``../shared/data`` beside the checkout); where none is
found and the hub is reachable, the Hugging Face ``datasets`` copies are used.

Eval texts follow the GPTQ reference: WikiText-2 test rows joined with "\\n\\n", PTB test sentences joined with " ".
``c4-heldout`` is the C4 file's last 100 documents joined with "\\n\\n" (disjoint from the calibration documents).
Calibration windows are drawn from the C4 file's first 900 documents joined with "\\n\\n" into one token stream (the
README of the data says only 38 documents are longer than ~2,048 tokens, so GPTQ's "pick a document longer than
seqlen" rule would sample from very few of them).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional

import numpy as np

FILES = {
    "wikitext2": "wikitext2_raw_v1_test_rows.json",
    "ptb": "ptb_test.txt",
    "c4": "c4_en_train_00000_first1000.jsonl",
    "wikitext2-train": "wikitext2_raw_train_first1MB.txt",
}
C4_CALIB_DOCS = slice(0, 900)
C4_HELDOUT_DOCS = slice(900, 1000)
EVAL_DATASETS = ("wikitext2", "ptb", "c4-heldout")


def data_dir(explicit: Optional[str] = None) -> Optional[Path]:
    if explicit:  # an explicit directory is used or rejected; never silently replaced by another one
        if any(Path(explicit, f).exists() for f in FILES.values()):
            return Path(explicit)
        raise FileNotFoundError(f"data directory {explicit} has none of {sorted(FILES.values())}")
    candidates = [os.environ.get("JAXQUANT_DATA"),
                  Path(__file__).resolve().parents[1].parent / "shared" / "data",
                  Path.cwd().parent / "shared" / "data", Path.cwd() / "shared" / "data"]
    for c in candidates:
        if c and any(Path(c, f).exists() for f in FILES.values()):
            return Path(c)
    return None


def _local(name: str, directory: Optional[str]) -> Optional[Path]:
    d = data_dir(directory)
    path = d / FILES[name] if d else None
    return path if path and path.exists() else None


def c4_documents(directory: Optional[str] = None) -> List[str]:
    path = _local("c4", directory)
    if path is None:
        raise FileNotFoundError(f"C4 calibration file {FILES['c4']} not found; pass --data-dir or set JAXQUANT_DATA")
    with open(path) as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def eval_text(dataset: str, directory: Optional[str] = None) -> str:
    """The evaluation string for ``dataset`` (a name in EVAL_DATASETS, or a path to any text file)."""
    if os.path.isfile(dataset):
        return Path(dataset).read_text()
    if dataset == "wikitext2":
        path = _local("wikitext2", directory)
        if path is not None:
            rows = json.loads(path.read_text())
        else:
            from datasets import load_dataset

            rows = load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"]
        return "\n\n".join(rows)
    if dataset == "ptb":
        path = _local("ptb", directory)
        if path is not None:
            lines = path.read_text().split("\n")
            lines = lines[:-1] if lines and lines[-1] == "" else lines
        else:
            from datasets import load_dataset

            lines = load_dataset("ptb_text_only", "penn_treebank", split="test")["sentence"]
        return " ".join(lines)
    if dataset == "c4-heldout":
        return "\n\n".join(c4_documents(directory)[C4_HELDOUT_DOCS])
    raise ValueError(f"unknown dataset {dataset!r}: use one of {EVAL_DATASETS} or a path to a text file")


def tokenize(tokenizer, text: str) -> np.ndarray:
    """Tokenize the whole string once, as the reference does (no special tokens added beyond the tokenizer's own)."""
    ids = tokenizer(text, return_tensors="np")["input_ids"][0]
    return ids.astype(np.int32)


def calibration_windows(tokenizer, n: int = 128, seqlen: int = 2048, seed: int = 0, source: str = "c4",
                        directory: Optional[str] = None) -> np.ndarray:
    """``[n, seqlen]`` token windows at random offsets (numpy RandomState(seed)) of one token stream.

    ``source``: "c4" (first 900 documents of the C4 file), "wikitext2" (the train excerpt), or a text file path.
    """
    if n < 1 or seqlen < 2:
        raise ValueError(f"need n >= 1 and seqlen >= 2 (got {n}, {seqlen})")
    if source == "c4":
        text = "\n\n".join(c4_documents(directory)[C4_CALIB_DOCS])
    elif source == "wikitext2":
        path = _local("wikitext2-train", directory)
        if path is None:
            raise FileNotFoundError(f"{FILES['wikitext2-train']} not found; pass --data-dir or set JAXQUANT_DATA")
        text = path.read_text()
    elif os.path.isfile(source):
        text = Path(source).read_text()
    else:
        raise ValueError(f"unknown calibration source {source!r}: c4, wikitext2 or a text file path")
    ids = tokenize(tokenizer, text)
    if ids.size <= seqlen:
        raise ValueError(f"calibration text has {ids.size} tokens, fewer than seqlen={seqlen}")
    rng = np.random.RandomState(seed)
    starts = rng.randint(0, ids.size - seqlen, size=n)
    return np.stack([ids[s: s + seqlen] for s in starts])
