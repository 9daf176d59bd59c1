"""Checkpoint reading: every on-disk format gives the same parameters, dtypes, and clear errors for broken
checkpoints (each message names what is wrong). Also a GGUF round trip through llama.cpp's Q/K row permutation."""
from __future__ import annotations

import copy
import json
import os
import re
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402
from flax.traverse_util import flatten_dict  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

import models  # noqa: E402
from models.weights import CheckpointError, read_gguf_tensors  # noqa: E402

SEQ = 11


def _flat(params):
    return {"/".join(k): np.asarray(v) for k, v in flatten_dict(params).items()}


def _copy(b, tmp_path, name="copy"):
    directory = tmp_path / name
    shutil.copytree(b.dir, directory)
    return directory


def _rewrite(directory, edit):
    """Load model.safetensors, apply ``edit(tensors)`` in place, write it back."""
    tensors = load_file(str(directory / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("tied", [True, False])
def test_all_formats_load_identical_params(tiny_llama, tmp_path, tied):
    b = tiny_llama(tie_word_embeddings=tied)
    ref = _flat(b.loaded.params)
    assert ("lm_head/kernel" in ref) == (not tied)
    # The parameters are the HF tensors themselves (linear weights transposed).
    sd = {k: v.numpy() for k, v in b.hf.state_dict().items()}
    np.testing.assert_array_equal(ref["embed_tokens/embedding"], sd["model.embed_tokens.weight"])
    np.testing.assert_array_equal(ref["layers_1/self_attn/k_proj/kernel"], sd["model.layers.1.self_attn.k_proj.weight"].T)
    np.testing.assert_array_equal(ref["layers_0/post_attention_layernorm/scale"],
                                  sd["model.layers.0.post_attention_layernorm.weight"])

    sharded = tmp_path / "sharded"
    b.hf.save_pretrained(str(sharded), max_shard_size="40KB")
    index = sharded / "model.safetensors.index.json"
    assert index.exists() and not (sharded / "model.safetensors").exists()
    shards = set(json.loads(index.read_text())["weight_map"].values())
    assert len(shards) > 2 and all((sharded / s).exists() for s in shards)

    # transformers 5 ignores safe_serialization=False (always writes safetensors), so the .bin is written the way
    # older transformers versions did: torch.save of the state dict (tied lm_head.weight included).
    binary = tmp_path / "bin"
    binary.mkdir()
    shutil.copy(os.path.join(b.dir, "config.json"), binary / "config.json")
    torch.save(b.hf.state_dict(), binary / "pytorch_model.bin")
    assert (binary / "pytorch_model.bin").exists() and not list(binary.glob("*.safetensors"))

    for directory in (sharded, binary):
        got = _flat(models.from_pretrained(str(directory), tokenizer=False).params)
        assert got.keys() == ref.keys(), directory
        for k in ref:
            assert got[k].dtype == np.float32
            np.testing.assert_array_equal(got[k], ref[k], err_msg=f"{directory.name}: {k}")


def test_bfloat16_checkpoint_file(tiny_llama, tmp_path):
    """A checkpoint stored in bfloat16 (numpy cannot hold it; read through torch) loads to the bf16 values."""
    b = tiny_llama()
    hf16 = copy.deepcopy(b.hf).to(torch.bfloat16)
    hf16.save_pretrained(str(tmp_path))
    params = _flat(models.from_pretrained(str(tmp_path), tokenizer=False).params)
    w = b.hf.model.layers[0].mlp.down_proj.weight.detach()
    np.testing.assert_array_equal(params["layers_0/mlp/down_proj/kernel"], w.bfloat16().float().numpy().T)
    assert not np.array_equal(params["layers_0/mlp/down_proj/kernel"], w.numpy().T)


@pytest.mark.parametrize("dtype,tol", [("bfloat16", 0.1), ("float16", 0.02)])
def test_low_precision_dtypes(tiny_llama, rel_err, rng, dtype, tol):
    b = tiny_llama()
    m = models.from_pretrained(b.dir, dtype=dtype, tokenizer=False)
    leaves = flatten_dict(m.params)
    assert leaves and all(v.dtype == jnp.dtype(dtype) for v in leaves.values())
    assert m.dtype == jnp.dtype(dtype)
    ids = jnp.asarray(rng.integers(0, 128, size=(2, SEQ)).astype(np.int32))
    low, _ = m(ids)
    ref, _ = b.loaded(ids)
    assert low.dtype == jnp.float32  # the head returns float32 logits
    err = rel_err(low, ref)
    assert 0 < err < tol, f"{dtype}: max|diff|/max|ref| = {err:.3g}"


def test_bad_dtype_rejected(tiny_llama):
    with pytest.raises(ValueError, match="unsupported dtype 'float8'"):
        models.from_pretrained(tiny_llama().dir, dtype="float8", tokenizer=False)


def test_unknown_model_type(tiny_llama, tmp_path):
    directory = _copy(tiny_llama(), tmp_path)
    cfg = json.loads((directory / "config.json").read_text())
    cfg["model_type"] = "mamba_xyz"
    (directory / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(NotImplementedError, match="model_type='mamba_xyz'"):
        models.from_pretrained(str(directory), tokenizer=False)


def _random_name(rng, directory):
    names = sorted(load_file(str(directory / "model.safetensors")))
    return names[int(rng.integers(len(names)))]


def test_missing_tensor_named(tiny_llama, tmp_path, rng):
    directory = _copy(tiny_llama(tie_word_embeddings=False), tmp_path)
    name = _random_name(rng, directory)
    _rewrite(directory, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match="missing") as err:
        models.from_pretrained(str(directory), tokenizer=False)
    assert re.search(rf"missing tensor\(s\) {re.escape(name)} \(Flax ", str(err.value)), str(err.value)


def test_wrong_shape_named_with_both_shapes(tiny_llama, tmp_path, rng):
    directory = _copy(tiny_llama(tie_word_embeddings=False), tmp_path)
    name = _random_name(rng, directory)
    shapes = {}

    def grow(t):
        old = t[name]
        new = np.concatenate([old, old[:1]], axis=0)  # one more row (or element)
        shapes["old"], shapes["new"] = old.shape, new.shape
        t[name] = new

    _rewrite(directory, grow)
    with pytest.raises(CheckpointError) as err:
        models.from_pretrained(str(directory), tokenizer=False)
    msg = str(err.value)
    # Both shapes in the checkpoint's (HF) layout.
    assert f"tensor {name!r} has shape {shapes['new']}, the model expects {shapes['old']}" in msg, msg


@pytest.mark.parametrize("extra", ["model.layers.0.self_attn.q_norm.weight", "model.layers.9.mlp.up_proj.weight"])
def test_extra_tensor_named(tiny_llama, tmp_path, rng, extra):
    directory = _copy(tiny_llama(), tmp_path)
    _rewrite(directory, lambda t: t.__setitem__(extra, rng.standard_normal((128, 64)).astype(np.float32)))
    with pytest.raises(CheckpointError, match=re.escape(repr(extra))):
        models.from_pretrained(str(directory), tokenizer=False)


def test_truncated_safetensors(tiny_llama, tmp_path):
    directory = _copy(tiny_llama(), tmp_path)
    path = directory / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read") as err:
        models.from_pretrained(str(directory), tokenizer=False)
    assert str(path) in str(err.value)


def test_truncated_header_safetensors(tiny_llama, tmp_path):
    directory = _copy(tiny_llama(), tmp_path)
    path = directory / "model.safetensors"
    path.write_bytes(path.read_bytes()[:5])
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        models.from_pretrained(str(directory), tokenizer=False)


def test_corrupt_pytorch_bin(tiny_llama, tmp_path):
    directory = tmp_path / "bin"
    directory.mkdir()
    shutil.copy(os.path.join(tiny_llama().dir, "config.json"), directory / "config.json")
    (directory / "pytorch_model.bin").write_bytes(os.urandom(300))
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        models.from_pretrained(str(directory), tokenizer=False)


def test_missing_shard(tiny_llama, tmp_path):
    directory = tmp_path / "sharded"
    tiny_llama().hf.save_pretrained(str(directory), max_shard_size="40KB")
    shard = sorted(directory.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=re.escape(shard.name)):
        models.from_pretrained(str(directory), tokenizer=False)


def test_directory_without_weights(tiny_llama, tmp_path):
    shutil.copy(os.path.join(tiny_llama().dir, "config.json"), tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="no weights in"):
        models.from_pretrained(str(tmp_path), tokenizer=False)


# ------------------------------------------------------------------------------------------------------------ GGUF
def _llama_cpp_permute(w, n_head):
    """What llama.cpp's convert_hf_to_gguf.py does to Q/K rows (LlamaModel.permute)."""
    rows, cols = w.shape
    return w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)


GGUF_NAMES = [
    (r"model\.embed_tokens\.weight", "token_embd.weight"), (r"model\.norm\.weight", "output_norm.weight"),
    (r"lm_head\.weight", "output.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", "blk.{}.attn_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", "blk.{}.ffn_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.weight", "blk.{}.attn_q.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.weight", "blk.{}.attn_k.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.weight", "blk.{}.attn_v.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", "blk.{}.attn_output.weight"),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", "blk.{}.ffn_gate.weight"),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", "blk.{}.ffn_up.weight"),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", "blk.{}.ffn_down.weight"),
]


def test_gguf_round_trip(tiny_llama, tmp_path, rel_err, rng):
    gguf = pytest.importorskip("gguf")
    b = tiny_llama(tie_word_embeddings=False)
    c = b.hf.config
    sd = {k: v.numpy().astype(np.float32) for k, v in b.hf.state_dict().items()}
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_vocab_size(c.vocab_size)
    for hf_name, w in sd.items():
        gguf_name = next(t.format(*m.groups()) for p, t in GGUF_NAMES if (m := re.fullmatch(p, hf_name)))
        if hf_name.endswith("q_proj.weight"):
            w = _llama_cpp_permute(w, c.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            w = _llama_cpp_permute(w, c.num_key_value_heads)
        writer.add_tensor(gguf_name, np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    # The permutation really moved rows (so an un-permute bug would show).
    q = sd["model.layers.0.self_attn.q_proj.weight"]
    assert not np.array_equal(_llama_cpp_permute(q, c.num_attention_heads), q)

    got = dict(read_gguf_tensors(str(path)))
    assert got.keys() == sd.keys()
    for k in sd:
        np.testing.assert_array_equal(got[k], sd[k], err_msg=k)

    # End to end: a directory holding only the GGUF file (config from its metadata) runs like the HF model.
    m = models.from_pretrained(str(tmp_path), tokenizer=False)
    assert not m.config.tie_word_embeddings and m.config.num_kv_heads == 2
    ids = rng.integers(0, 128, size=(2, SEQ)).astype(np.int32)
    assert rel_err(m(jnp.asarray(ids))[0], b.hf_logits(ids)) < 1e-4
