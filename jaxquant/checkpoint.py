"""Quantized checkpoints (orbax). Placeholder until the GPTQ issue lands: recognises no directory yet."""
from __future__ import annotations

import os

METADATA_FILE = "jaxquant.json"


def is_checkpoint(path: str) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, METADATA_FILE))


def load(path: str):
    raise NotImplementedError("loading quantized checkpoints arrives with the GPTQ issue")
