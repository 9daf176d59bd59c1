"""OPT and Falcon: logits parity with transformers (tiny random checkpoints built locally), KV cache, weight errors."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax.traverse_util import flatten_dict  # noqa: E402

import models  # noqa: E402
from models.common import init_cache  # noqa: E402
from models.weights import CheckpointError  # noqa: E402

BATCH, SEQ = 2, 13


def _opt(**kw):
    base = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                max_position_embeddings=64, dropout=0.0)
    base.update(kw)
    return transformers.OPTConfig(**base)


def _falcon(**kw):
    base = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, alibi=False)
    base.update(kw)
    return transformers.FalconConfig(**base)


CASES = {
    # opt-125m-like: pre-LN, final layer norm, tied head.
    "opt-pre-ln": lambda: (transformers.OPTForCausalLM, _opt(do_layer_norm_before=True)),
    # opt-350m-like: post-LN (no final layer norm), word_embed_proj_dim != hidden_size -> project_in/out.
    "opt-post-ln-proj": lambda: (transformers.OPTForCausalLM,
                                 _opt(hidden_size=48, word_embed_proj_dim=24, do_layer_norm_before=False)),
    # the less common switches: no biases, non-affine layer norms, GELU, untied head.
    "opt-nobias-noaffine": lambda: (transformers.OPTForCausalLM,
                                    _opt(enable_bias=False, layer_norm_elementwise_affine=False,
                                         activation_function="gelu", tie_word_embeddings=False)),
    # falcon-7b-like: multi-query (1 K/V head), parallel attention + MLP off one input_layernorm.
    "falcon-7b": lambda: (transformers.FalconForCausalLM,
                          _falcon(multi_query=True, parallel_attn=True, new_decoder_architecture=False)),
    # falcon-40b-like: new decoder architecture, grouped K/V (8 heads over 2), ln_attn/ln_mlp, biases, rope_theta.
    "falcon-40b": lambda: (transformers.FalconForCausalLM,
                           _falcon(num_attention_heads=8, num_kv_heads=2, new_decoder_architecture=True, bias=True,
                                   rope_parameters={"rope_type": "default", "rope_theta": 500.0})),
    # Falcon2-11B-like: new architecture with a single layer norm, untied head.
    "falcon-new-1ln": lambda: (transformers.FalconForCausalLM,
                               _falcon(num_kv_heads=2, new_decoder_architecture=True, num_ln_in_parallel_attn=1,
                                       tie_word_embeddings=False)),
    # classic sequential block: no multi-query, no parallel attention, post_attention_layernorm.
    "falcon-sequential": lambda: (transformers.FalconForCausalLM,
                                  _falcon(multi_query=False, parallel_attn=False, bias=True)),
}


def _check_layout(name, hf_model):
    """The HF model really has the structure the case is meant to exercise."""
    c = hf_model.config
    if name.startswith("opt"):
        dec = hf_model.model.decoder
        assert (dec.project_in is not None) == (name == "opt-post-ln-proj")
        assert (dec.final_layer_norm is not None) == c.do_layer_norm_before
        tied = hf_model.lm_head.weight.data_ptr() == dec.embed_tokens.weight.data_ptr()
        assert tied == (name != "opt-nobias-noaffine")
        if name == "opt-nobias-noaffine":
            assert dec.layers[0].fc1.bias is None and dec.layers[0].self_attn_layer_norm.weight is None
        return
    layer = hf_model.transformer.h[0]
    qkv_out = layer.self_attention.query_key_value.out_features
    head_dim = c.hidden_size // c.num_attention_heads
    assert not c.alibi
    if name == "falcon-7b":
        assert c.multi_query and c.parallel_attn and not c.new_decoder_architecture
        assert qkv_out == c.hidden_size + 2 * head_dim and hasattr(layer, "input_layernorm")
    elif name == "falcon-40b":
        assert c.new_decoder_architecture and c.num_kv_heads == 2 and c.num_attention_heads == 8 and c.bias
        assert qkv_out == (8 + 2 * 2) * head_dim and hasattr(layer, "ln_attn") and hasattr(layer, "ln_mlp")
        assert c.rope_parameters["rope_theta"] == 500.0
    elif name == "falcon-new-1ln":
        assert c.new_decoder_architecture and c.num_ln_in_parallel_attn == 1 and not c.tie_word_embeddings
        assert not hasattr(layer, "ln_attn") and hasattr(layer, "input_layernorm")
        assert hf_model.lm_head.weight.data_ptr() != hf_model.transformer.word_embeddings.weight.data_ptr()
    elif name == "falcon-sequential":
        assert not c.multi_query and not c.parallel_attn and not c.new_decoder_architecture
        assert qkv_out == 3 * c.hidden_size and hasattr(layer, "post_attention_layernorm")


def _randomize(model, gen):
    """Every parameter random (biases and layer-norm affines included, so a swapped or dropped one shows)."""
    with torch.no_grad():
        for module in model.modules():
            for pname, p in module.named_parameters(recurse=False):
                noise = 0.1 * torch.randn(p.shape, generator=gen)
                is_ln_scale = isinstance(module, torch.nn.LayerNorm) and pname == "weight"
                p.copy_(noise + 1.0 if is_ln_scale else noise)


class Built:
    def __init__(self, name, directory, hf_model, seed):
        self.name, self.dir, self.hf, self.seed = name, directory, hf_model, seed
        self.loaded = models.from_pretrained(directory, tokenizer=False)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            seed = int.from_bytes(os.urandom(4), "little")
            gen = torch.Generator().manual_seed(seed)
            cls, cfg = CASES[name]()
            torch.manual_seed(seed)
            hf_model = cls(cfg).eval()
            _randomize(hf_model, gen)
            _check_layout(name, hf_model)
            directory = str(tmp_path_factory.mktemp(name))
            hf_model.save_pretrained(directory)
            cache[name] = Built(name, directory, hf_model, seed)
        return cache[name]

    return get


def _ids(vocab, rng, batch=BATCH, seq=SEQ):
    return rng.integers(0, vocab, size=(batch, seq)).astype(np.int32)


def _rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(built, name):
    b = built(name)
    ids = _ids(b.hf.config.vocab_size, np.random.default_rng())
    with torch.no_grad():
        ref = b.hf(torch.from_numpy(ids).long(), use_cache=False).logits.numpy()
    logits, cache = b.loaded(jnp.asarray(ids))
    assert cache is None and logits.dtype == jnp.float32 and logits.shape == ref.shape
    rel = _rel(logits, ref)
    assert rel < 1e-4, f"{name}: max|diff|/max|ref| = {rel:.2e} (weight seed {b.seed}, ids {ids.tolist()})"


@pytest.mark.parametrize("name", ["opt-pre-ln", "opt-post-ln-proj", "falcon-7b", "falcon-40b"])
def test_kv_cache_two_chunks_match_full_forward(built, name):
    b = built(name)
    m = b.loaded
    ids = jnp.asarray(_ids(m.config.vocab_size, np.random.default_rng()))
    full, _ = m(ids)
    first = 5
    cache = init_cache(m.config.num_layers, BATCH, 16, *m.config.kv_cache_shape, jnp.float32)
    step = jax.jit(lambda params, ids, pos, cache, idx: m.module.apply({"params": params}, ids, positions=pos,
                                                                       cache=cache, cache_index=idx))
    pos = jnp.broadcast_to(jnp.arange(SEQ), ids.shape)
    out1, cache = step(m.params, ids[:, :first], pos[:, :first], cache, 0)
    out2, cache = step(m.params, ids[:, first:], pos[:, first:], cache, first)
    assert len(cache) == m.config.num_layers
    assert cache[0]["k"].shape == (BATCH, 16, *m.config.kv_cache_shape)
    chunked = jnp.concatenate([out1, out2], axis=1)
    assert float(jnp.max(jnp.abs(chunked - full))) < 1e-5 * max(1.0, float(jnp.max(jnp.abs(full))))


@pytest.mark.parametrize("name", ["opt-post-ln-proj", "falcon-40b", "falcon-sequential"])
def test_layerwise_protocol(built, name):
    """embed -> DecoderLayer per layer (own params) -> head equals __call__; SEQUENTIAL_GROUPS cover every kernel."""
    b = built(name)
    m = b.loaded
    fam, params = m.family, m.params
    ids = jnp.asarray(_ids(m.config.vocab_size, np.random.default_rng()))
    pos = jnp.broadcast_to(jnp.arange(SEQ), ids.shape)
    full, _ = m(ids, positions=pos)
    h = m.module.apply({"params": params}, ids, pos, method="embed")
    layer = fam.DecoderLayer(m.config, m.dtype)
    grouped = {p for g in fam.SEQUENTIAL_GROUPS for p in g}
    for i in range(m.config.num_layers):
        lp = params[f"layers_{i}"]
        kernels = {"/".join(k[:-1]) for k in flatten_dict(lp) if k[-1] == "kernel"}
        assert kernels == grouped, (kernels, grouped)
        (h, _), state = layer.apply({"params": lp}, h, pos, mutable=["intermediates"])
        sown = {"/".join(k[:-1]) for k in flatten_dict(state["intermediates"])}
        assert grouped <= sown
    logits = m.module.apply({"params": params}, h, method="head")
    np.testing.assert_allclose(np.asarray(logits), np.asarray(full), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name,prefix", [("opt-post-ln-proj", "model."), ("falcon-7b", "transformer.")])
def test_base_model_prefix_accepted(built, tmp_path, name, prefix):
    """A checkpoint of the bare base model (OPTModel: 'decoder.*', FalconModel: no prefix) loads the same weights."""
    from safetensors.numpy import load_file, save_file

    b = built(name)
    directory = tmp_path / "bare"
    shutil.copytree(b.dir, directory)
    tensors = load_file(str(directory / "model.safetensors"))
    renamed = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in tensors.items() if k != "lm_head.weight"}
    assert renamed.keys() != tensors.keys()
    save_file(renamed, str(directory / "model.safetensors"), metadata={"format": "pt"})
    loaded = models.from_pretrained(str(directory), tokenizer=False)
    ids = jnp.asarray(_ids(loaded.config.vocab_size, np.random.default_rng()))
    np.testing.assert_array_equal(np.asarray(loaded(ids)[0]), np.asarray(b.loaded(ids)[0]))


def test_tied_head_in_checkpoint_is_accepted(built, tmp_path):
    """Older exports of tied OPT checkpoints also carry lm_head.weight (a copy of embed_tokens): still loads."""
    from safetensors.numpy import load_file, save_file

    b = built("opt-pre-ln")
    directory = tmp_path / "with_head"
    shutil.copytree(b.dir, directory)
    tensors = load_file(str(directory / "model.safetensors"))
    assert "lm_head.weight" not in tensors
    tensors["lm_head.weight"] = tensors["model.decoder.embed_tokens.weight"].copy()
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    loaded = models.from_pretrained(str(directory), tokenizer=False)
    assert "lm_head" not in loaded.params
    ids = jnp.asarray(_ids(loaded.config.vocab_size, np.random.default_rng()))
    np.testing.assert_array_equal(np.asarray(loaded(ids)[0]), np.asarray(b.loaded(ids)[0]))


@pytest.mark.parametrize("name,tensor,path", [
    ("opt-pre-ln", "model.decoder.layers.1.self_attn.k_proj.weight", "layers_1/self_attn/k_proj/kernel"),
    ("falcon-40b", "transformer.h.1.self_attention.query_key_value.weight",
     "layers_1/self_attention/query_key_value/kernel"),
])
def test_missing_tensor_is_named(built, tmp_path, name, tensor, path):
    from safetensors.numpy import load_file, save_file

    b = built(name)
    directory = tmp_path / "broken"
    shutil.copytree(b.dir, directory)
    tensors = load_file(str(directory / "model.safetensors"))
    del tensors[tensor]
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="missing") as err:
        models.from_pretrained(str(directory), tokenizer=False)
    assert path in str(err.value)  # convert() names the Flax path of the absent HF tensor


def test_falcon_alibi_rejected(tmp_path):
    cfg = _falcon(alibi=True, multi_query=False, parallel_attn=False)
    assert cfg.alibi
    cfg.save_pretrained(str(tmp_path))
    with pytest.raises(NotImplementedError, match="Falcon with ALiBi is not supported"):
        models.from_pretrained(str(tmp_path), tokenizer=False)


def test_falcon_unrunnable_layout_rejected():
    hf = _falcon(new_decoder_architecture=True, parallel_attn=False, num_kv_heads=2).to_dict()
    with pytest.raises(NotImplementedError, match="parallel_attn=False"):
        models.build(hf)
