"""Reading HF checkpoints (safetensors, sharded safetensors, pytorch_model.bin, GGUF) into Flax parameter trees.

Nothing here unpickles untrusted data: ``.bin`` files go through ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Dict, Iterator, Optional, Tuple

import numpy as np


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not match the model it is loaded into."""


@dataclasses.dataclass(frozen=True)
class Rule:
    """Maps HF parameter names matching ``pattern`` to the Flax path ``target`` (``{0}``.. are regex groups)."""

    pattern: str
    target: str
    linear: bool = False  # HF Linear weight [out, in] -> Flax kernel [in, out]

    def match(self, name: str) -> Optional[Tuple[str, ...]]:
        m = re.fullmatch(self.pattern, name)
        return tuple(self.target.format(*m.groups()).split("/")) if m else None

    def hf_name(self, path: Tuple[str, ...]) -> Optional[str]:
        """The inverse of ``match`` (for error messages): the HF name a Flax path comes from, or None."""
        target = re.escape(self.target).replace(r"\{", "{").replace(r"\}", "}")
        m = re.fullmatch(re.sub(r"\{\d+\}", "(.+?)", target), "/".join(path))
        if not m:
            return None
        name = re.sub(r"\(\?:[^()]*\)\?", "", self.pattern)  # drop optional prefixes such as (?:transformer\.)?
        for value in m.groups():
            name = re.sub(r"\((?!\?)[^()]*\)", lambda _: value, name, count=1)
        return name.replace("\\", "")


# ------------------------------------------------------------------------------------------------- state dicts
def _to_numpy(t) -> np.ndarray:
    """torch tensor (incl. bfloat16) -> numpy float32/int array."""
    import torch

    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.detach().cpu().numpy()


def _read_safetensors(path: str) -> Iterator[Tuple[str, np.ndarray]]:
    from safetensors import safe_open

    # safetensors reports a truncated or corrupt file with its own SafetensorError (a plain Exception subclass):
    # every failure to read becomes a CheckpointError naming the file.
    try:
        f = safe_open(path, framework="np")
        names = list(f.keys())
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(f"cannot read safetensors file {path}: {err}") from err
    pt = None
    for name in names:
        try:
            try:
                array = f.get_tensor(name)
            except TypeError as err:  # the numpy backend cannot hold bfloat16; go through torch for those tensors
                if "bf16" not in str(err).lower() and "bfloat16" not in str(err).lower():
                    raise
                pt = pt or safe_open(path, framework="pt")
                array = _to_numpy(pt.get_tensor(name))
        except Exception as err:  # noqa: BLE001
            raise CheckpointError(f"cannot read tensor {name!r} from safetensors file {path}: {err}") from err
        yield name, array


def _read_torch_bin(path: str) -> Iterator[Tuple[str, np.ndarray]]:
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for corrupt/unsafe files
        raise CheckpointError(f"cannot read {path} safely (weights_only=True): {err}") from err
    for name, t in state.items():
        yield name, _to_numpy(t)


def find_gguf(directory: str) -> Optional[str]:
    files = sorted(f for f in os.listdir(directory) if f.endswith(".gguf"))
    return os.path.join(directory, files[0]) if files else None


def iter_state_dict(path: str) -> Iterator[Tuple[str, np.ndarray]]:
    """Yields (hf_name, array) from a model directory or a single weights file."""
    if os.path.isfile(path):
        files = [path]
    else:
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = [os.path.join(path, f) for f in sorted(set(weight_map.values()))]
            missing = [f for f in files if not os.path.exists(f)]
            if missing:
                raise CheckpointError(f"shard(s) listed in {index} are missing: {missing}")
        elif os.path.exists(os.path.join(path, "model.safetensors")):
            files = [os.path.join(path, "model.safetensors")]
        elif os.path.exists(os.path.join(path, "pytorch_model.bin.index.json")):
            with open(os.path.join(path, "pytorch_model.bin.index.json")) as f:
                files = [os.path.join(path, x) for x in sorted(set(json.load(f)["weight_map"].values()))]
        elif os.path.exists(os.path.join(path, "pytorch_model.bin")):
            files = [os.path.join(path, "pytorch_model.bin")]
        elif find_gguf(path):
            files = [find_gguf(path)]
        else:
            raise CheckpointError(f"no weights in {path} (looked for model.safetensors[.index.json], "
                                  "pytorch_model.bin[.index.json], *.gguf)")
    for f in files:
        if f.endswith(".safetensors"):
            yield from _read_safetensors(f)
        elif f.endswith(".bin") or f.endswith(".pt"):
            yield from _read_torch_bin(f)
        elif f.endswith(".gguf"):
            yield from read_gguf_tensors(f)
        else:
            raise CheckpointError(f"unknown weights file type: {f}")


# ---------------------------------------------------------------------------------------------------------- GGUF
_GGUF_LLAMA_NAMES = (
    (r"token_embd\.weight", "model.embed_tokens.weight"),
    (r"output_norm\.weight", "model.norm.weight"),
    (r"output\.weight", "lm_head.weight"),
    (r"blk\.(\d+)\.attn_norm\.weight", "model.layers.{0}.input_layernorm.weight"),
    (r"blk\.(\d+)\.ffn_norm\.weight", "model.layers.{0}.post_attention_layernorm.weight"),
    (r"blk\.(\d+)\.attn_q\.weight", "model.layers.{0}.self_attn.q_proj.weight"),
    (r"blk\.(\d+)\.attn_k\.weight", "model.layers.{0}.self_attn.k_proj.weight"),
    (r"blk\.(\d+)\.attn_v\.weight", "model.layers.{0}.self_attn.v_proj.weight"),
    (r"blk\.(\d+)\.attn_output\.weight", "model.layers.{0}.self_attn.o_proj.weight"),
    (r"blk\.(\d+)\.ffn_gate\.weight", "model.layers.{0}.mlp.gate_proj.weight"),
    (r"blk\.(\d+)\.ffn_up\.weight", "model.layers.{0}.mlp.up_proj.weight"),
    (r"blk\.(\d+)\.ffn_down\.weight", "model.layers.{0}.mlp.down_proj.weight"),
)


def _gguf_field(reader, key, default=None):
    field = reader.fields.get(key)
    return field.contents() if field is not None else default


def _unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter interleaves the two rotary halves of each head in Q/K rows; put them back (HF order)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_gguf_tensors(path: str) -> Iterator[Tuple[str, np.ndarray]]:
    """Dequantized tensors of a LLaMA-architecture GGUF file under their HF names (float32)."""
    try:
        import gguf
    except ImportError as err:
        raise ImportError("reading GGUF needs the `gguf` package: pip install 'jaxquant[gguf]'") from err
    reader = gguf.GGUFReader(path)
    arch = _gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise NotImplementedError(f"GGUF architecture {arch!r} is not supported (only 'llama')")
    n_head = int(_gguf_field(reader, "llama.attention.head_count"))
    n_kv = int(_gguf_field(reader, "llama.attention.head_count_kv", n_head))
    for t in reader.tensors:
        hf_name = None
        for pattern, target in _GGUF_LLAMA_NAMES:
            m = re.fullmatch(pattern, t.name)
            if m:
                hf_name = target.format(*m.groups())
                break
        if hf_name is None:
            if t.name == "rope_freqs.weight":  # llama3 rope factors, recomputed from the config
                continue
            raise CheckpointError(f"unknown GGUF tensor {t.name!r} in {path}")
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        w = w.reshape([int(d) for d in reversed(t.shape)])  # GGUF lists dims fastest-first
        if hf_name.endswith("q_proj.weight"):
            w = _unpermute_rope_rows(w, n_head)
        elif hf_name.endswith("k_proj.weight"):
            w = _unpermute_rope_rows(w, n_kv)
        yield hf_name, w


# ---------------------------------------------------------------------------------------------------- conversion
def convert(state: Iterator[Tuple[str, np.ndarray]], rules, expected: dict, dtype,
            source: str = "checkpoint", ignore: Tuple[str, ...] = (), on_host: bool = False) -> dict:
    """HF (name, array) pairs -> nested Flax params, checked against ``expected`` (a tree of ShapeDtypeStructs).

    on_host: keep the arrays in host memory (numpy) instead of putting them on the default device, for models larger
    than the device (the quantization pipeline moves one decoder layer at a time).

    Every expected parameter must be present with the right shape; an unknown or mismatched tensor is an error that
    names it. ``ignore``: regexes of HF names that are legitimately unused (e.g. rotary buffers).
    """
    import jax.numpy as jnp
    from flax.traverse_util import flatten_dict, unflatten_dict

    want = {k: v.shape for k, v in flatten_dict(expected).items()}
    got: Dict[tuple, np.ndarray] = {}
    for name, array in state:
        path = next((p for p in (r.match(name) for r in rules) if p is not None), None)
        if path is None:
            if any(re.fullmatch(p, name) for p in ignore):
                continue
            raise CheckpointError(f"{source}: tensor {name!r} has no place in this model (unknown parameter)")
        linear = next(r.linear for r in rules if r.match(name) is not None)
        if path not in want:
            if path[-1] == "kernel" and path[0] == "lm_head":
                continue  # tied embeddings: checkpoint still carries lm_head.weight; the model uses the embedding
            raise CheckpointError(f"{source}: tensor {name!r} maps to {'/'.join(path)}, which this model config "
                                  "does not have")
        # Compare in the checkpoint's layout ([out, in] for linear weights), so both shapes in the message are the
        # ones a user sees in the file and in the HF model.
        expected = tuple(want[path])[::-1] if linear else tuple(want[path])
        if tuple(array.shape) != expected:
            raise CheckpointError(f"{source}: tensor {name!r} has shape {tuple(array.shape)}, the model expects "
                                  f"{expected} (as {'/'.join(path)}{', transposed' if linear else ''})")
        if linear:
            array = array.T
        got[path] = np.asarray(array, dtype=dtype) if on_host else jnp.asarray(array, dtype=dtype)
    missing = [p for p in want if p not in got]
    if missing:
        def describe(path):
            hf = next((n for n in (r.hf_name(path) for r in rules) if n), None)
            return f"{hf} (Flax {'/'.join(path)})" if hf else "/".join(path)

        raise CheckpointError(f"{source}: missing tensor(s) " + ", ".join(describe(p) for p in missing[:8])
                              + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
    return unflatten_dict(got)
