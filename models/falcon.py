"""Falcon family (tiiuae/falcon-7b/40b/180b, Falcon2-11B): fused QKV, rotary, GELU MLP, LayerNorm.

The three layouts transformers' ``modeling_falcon.py`` runs, and how ``query_key_value``'s output is split:

* 7B style (``multi_query=True``, ``new_decoder_architecture=False``): ``[num_heads q | 1 k | 1 v]`` heads; one
  ``input_layernorm`` feeds attention and (``parallel_attn``) the MLP in parallel.
* 40B style (``new_decoder_architecture=True``): grouped, ``num_kv_heads`` groups of ``[num_heads/num_kv_heads q | k
  | v]``; ``ln_attn`` / ``ln_mlp`` (or one ``input_layernorm`` when ``num_ln_in_parallel_attn == 1``), always parallel.
* classic (``multi_query=False``): per head ``[q | k | v]``; ``parallel_attn=False`` gives a sequential block with
  ``post_attention_layernorm``.

``query_key_value`` stays one Linear in the Flax tree (1:1 with the HF tensor); the forward splits its output. ALiBi
Falcon (falcon-rw) is rejected at config time.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.common import (AttentionModule, CausalLM, Embed, LayerNorm, Linear, cached_attention,
                           residual_stream, rope_inverse_frequencies, rope_parameters)
from models.weights import Rule

# HF get_activation names -> JAX. Falcon's default "gelu" is transformers' GELUActivation: exact (erf) GELU.
ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class FalconConfig:
    vocab_size: int
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int  # heads of K/V as stored in the cache: 1 (multi-query), num_kv_heads (new arch), or num_heads
    new_decoder_architecture: bool = False
    multi_query: bool = True
    parallel_attn: bool = True
    num_ln_in_parallel_attn: int = 1  # 2: separate ln_attn / ln_mlp (new architecture only)
    bias: bool = False
    layer_norm_epsilon: float = 1e-5
    rope: tuple = (("rope_theta", 10000.0), ("rope_type", "default"))  # sorted items of the HF rope parameters
    activation: str = "gelu"
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 2048

    family = "falcon"

    @classmethod
    def from_hf(cls, hf: dict) -> "FalconConfig":
        if hf.get("alibi", False):
            raise NotImplementedError("Falcon with ALiBi is not supported")
        act = hf.get("activation", "gelu")
        if act not in ACTIVATIONS:
            raise NotImplementedError(f"Falcon with activation={act!r} is not supported "
                                      f"(supported: {', '.join(ACTIVATIONS)})")
        hidden = hf.get("hidden_size") or hf["n_embed"]
        heads = hf.get("num_attention_heads") or hf["n_head"]
        if hidden % heads:
            raise ValueError(f"Falcon hidden_size={hidden} is not divisible by num_attention_heads={heads}")
        new_arch = bool(hf.get("new_decoder_architecture", False))
        multi_query = bool(hf.get("multi_query", True))
        parallel = bool(hf.get("parallel_attn", True))
        num_ln = hf.get("num_ln_in_parallel_attn")
        if new_arch:
            if not parallel:
                # transformers builds input/post_attention layer norms here but its forward reads ln_attn (or an
                # unset MLP input): the layout does not run there either.
                raise NotImplementedError("Falcon with new_decoder_architecture=True and parallel_attn=False is not "
                                          "supported (transformers cannot run it either)")
            kv = hf.get("num_kv_heads") or hf.get("n_head_kv") or heads
            if heads % kv:
                raise ValueError(f"Falcon num_attention_heads={heads} is not divisible by num_kv_heads={kv}")
            num_ln = 2 if num_ln is None else int(num_ln)
        else:
            # Outside the new architecture the split ignores num_kv_heads: 1 K/V head (multi-query) or one per head.
            kv = 1 if multi_query else heads
            if parallel and num_ln not in (None, 1):
                raise NotImplementedError(f"Falcon with num_ln_in_parallel_attn={num_ln} needs "
                                          "new_decoder_architecture=True (transformers ignores ln_attn/ln_mlp else)")
            num_ln = 1
        if num_ln not in (1, 2):
            raise NotImplementedError(f"Falcon with num_ln_in_parallel_attn={num_ln} is not supported")
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hidden,
            ffn_hidden_size=hf.get("ffn_hidden_size") or 4 * hidden,
            num_layers=hf.get("num_hidden_layers") or hf["n_layer"],
            num_heads=heads,
            num_kv_heads=kv,
            new_decoder_architecture=new_arch,
            multi_query=multi_query,
            parallel_attn=parallel,
            num_ln_in_parallel_attn=num_ln,
            bias=bool(hf.get("bias", False)),
            layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
            rope=tuple(sorted(rope_parameters(hf).items())),
            activation=act,
            tie_word_embeddings=hf.get("tie_word_embeddings", True),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def qkv_features(self) -> int:
        if self.new_decoder_architecture:
            return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        if self.multi_query:
            return self.hidden_size + 2 * self.head_dim
        return 3 * self.hidden_size

    @property
    def kv_cache_shape(self):
        return self.num_kv_heads, self.head_dim


# Sub-layers in true-sequential order; the fused QKV is one group of one.
SEQUENTIAL_GROUPS = (
    ("self_attention/query_key_value",),
    ("self_attention/dense",),
    ("mlp/dense_h_to_4h",),
    ("mlp/dense_4h_to_h",),
)

# HF name -> Flax path. FalconForCausalLM saves under "transformer."; a bare FalconModel without prefix: both accepted.
_T = r"(?:transformer\.)?"
NAME_MAP = (
    Rule(_T + r"word_embeddings\.weight", "word_embeddings/embedding"),
    Rule(_T + r"ln_f\.weight", "ln_f/scale"),
    Rule(_T + r"ln_f\.bias", "ln_f/bias"),
    Rule(r"lm_head\.weight", "lm_head/kernel", linear=True),  # dropped by convert() when tied
    Rule(_T + r"h\.(\d+)\.self_attention\.(query_key_value|dense)\.weight", "layers_{0}/self_attention/{1}/kernel",
         linear=True),
    Rule(_T + r"h\.(\d+)\.self_attention\.(query_key_value|dense)\.bias", "layers_{0}/self_attention/{1}/bias"),
    Rule(_T + r"h\.(\d+)\.mlp\.(dense_h_to_4h|dense_4h_to_h)\.weight", "layers_{0}/mlp/{1}/kernel", linear=True),
    Rule(_T + r"h\.(\d+)\.mlp\.(dense_h_to_4h|dense_4h_to_h)\.bias", "layers_{0}/mlp/{1}/bias"),
    Rule(_T + r"h\.(\d+)\.(input_layernorm|post_attention_layernorm|ln_attn|ln_mlp)\.weight", "layers_{0}/{1}/scale"),
    Rule(_T + r"h\.(\d+)\.(input_layernorm|post_attention_layernorm|ln_attn|ln_mlp)\.bias", "layers_{0}/{1}/bias"),
)


def split_qkv(fused: jax.Array, c: FalconConfig):
    """HF ``FalconAttention._split_heads``: fused [B, T, F] -> q [B, T, H, D], k/v [B, T, KV, D].

    For the new architecture HF broadcasts each group's K/V over its query heads; here K/V keep their ``num_kv_heads``
    heads and the grouped attention (query head ``g * (H/KV) + j`` reads K/V head ``g``) does the same.
    """
    b, t, _ = fused.shape
    d = c.head_dim
    if c.new_decoder_architecture:
        g = c.num_heads // c.num_kv_heads
        qkv = fused.reshape(b, t, c.num_kv_heads, g + 2, d)
        return qkv[:, :, :, :g].reshape(b, t, c.num_heads, d), qkv[:, :, :, g], qkv[:, :, :, g + 1]
    if c.multi_query:
        qkv = fused.reshape(b, t, c.num_heads + 2, d)
        return qkv[:, :, :-2], qkv[:, :, -2:-1], qkv[:, :, -1:]
    qkv = fused.reshape(b, t, c.num_heads, 3, d)
    return qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]


class Attention(AttentionModule):
    config: FalconConfig
    dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        self.query_key_value = Linear(c.qkv_features, c.bias, self.dtype)
        self.dense = Linear(c.hidden_size, c.bias, self.dtype)
        self.inv_freq = rope_inverse_frequencies(c.head_dim, dict(c.rope))

    def __call__(self, x, positions, cache=None, cache_index=None, kv_mask=None):
        b, t, _ = x.shape
        q, k, v = split_qkv(self.query_key_value(x), self.config)
        # scale 1/sqrt(head_dim), as HF
        out, cache = cached_attention(q, k, v, cache, cache_index, kv_mask, self.attention_activation,
                                      rope=(positions, self.inv_freq))
        return self.dense(out.reshape(b, t, -1)), cache


class MLP(nn.Module):
    config: FalconConfig
    dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        self.dense_h_to_4h = Linear(c.ffn_hidden_size, c.bias, self.dtype)
        self.dense_4h_to_h = Linear(c.hidden_size, c.bias, self.dtype)

    def __call__(self, x):
        return self.dense_4h_to_h(ACTIVATIONS[self.config.activation](self.dense_h_to_4h(x)))


class DecoderLayer(nn.Module):
    config: FalconConfig
    dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        self.self_attention = Attention(c, self.dtype)
        self.mlp = MLP(c, self.dtype)
        if not c.parallel_attn:
            self.input_layernorm = LayerNorm(c.layer_norm_epsilon, self.dtype)
            self.post_attention_layernorm = LayerNorm(c.layer_norm_epsilon, self.dtype)
        elif c.new_decoder_architecture and c.num_ln_in_parallel_attn == 2:
            self.ln_attn = LayerNorm(c.layer_norm_epsilon, self.dtype)
            self.ln_mlp = LayerNorm(c.layer_norm_epsilon, self.dtype)
        else:
            self.input_layernorm = LayerNorm(c.layer_norm_epsilon, self.dtype)

    def __call__(self, h, positions, cache=None, cache_index=None, kv_mask=None):
        c = self.config
        if c.parallel_attn and c.new_decoder_architecture and c.num_ln_in_parallel_attn == 2:
            attn_in, mlp_in = self.ln_attn(h), self.ln_mlp(h)
        else:
            attn_in = mlp_in = self.input_layernorm(h)
        attn, cache = self.self_attention(attn_in, positions, cache, cache_index, kv_mask)
        if c.parallel_attn:
            return residual_stream(h + (self.mlp(mlp_in) + attn)), cache
        h = residual_stream(h + attn)
        return residual_stream(h + self.mlp(self.post_attention_layernorm(h))), cache


class FalconForCausalLM(CausalLM):
    """``__call__(ids [B,T], positions [B,T]?, cache?, cache_index?, kv_mask?) -> (logits [B,T,V] f32, cache)``."""

    config: FalconConfig
    dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        self.word_embeddings = Embed(c.vocab_size, c.hidden_size, self.dtype)
        self.layers = [DecoderLayer(c, self.dtype) for _ in range(c.num_layers)]
        self.ln_f = LayerNorm(c.layer_norm_epsilon, self.dtype)
        if not c.tie_word_embeddings:
            self.lm_head = Linear(c.vocab_size, False, self.dtype)

    def embed(self, ids, positions):
        return self.word_embeddings(ids)

    def head(self, h):
        h = self.ln_f(h)
        logits = self.word_embeddings.attend(h) if self.config.tie_word_embeddings else self.lm_head(h)
        return logits.astype(jnp.float32)


CONFIG = FalconConfig
MODEL = FalconForCausalLM
# Rotary buffers that older exports carried; recomputed from the config.
IGNORED_WEIGHTS = (r"(?:transformer\.)?rotary_emb\.inv_freq",
                   r"(?:transformer\.)?h\.\d+\.self_attention\.rotary_emb\.inv_freq")
