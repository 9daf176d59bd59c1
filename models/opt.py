"""OPT family (facebook/opt-125m .. 66b): learned positions (offset 2), LayerNorm pre-LN or post-LN, ReLU MLP, biases.

OPT-350M is the odd one: post-LN (``do_layer_norm_before=False``, so no final layer norm) and a narrower word-embedding
width (``word_embed_proj_dim``) bridged by ``project_in`` / ``project_out``. The output projection is tied to
``embed_tokens`` (``tie_word_embeddings``, True for every released OPT checkpoint).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.common import (AttentionModule, CausalLM, Embed, LayerNorm, Linear, cached_attention, permuted_input,
                           residual_stream)
from models.weights import Rule

# HF ACT2FN names -> JAX. "gelu" is the exact (erf) GELU, the tanh forms are the approximate one.
ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}

# OPT's learned position table has 2 extra rows in front (a fairseq padding_idx leftover): position p is row p + 2.
POSITION_OFFSET = 2


@dataclasses.dataclass(frozen=True)
class OPTConfig:
    vocab_size: int
    hidden_size: int
    ffn_dim: int
    num_layers: int
    num_heads: int
    word_embed_proj_dim: int
    max_position_embeddings: int = 2048
    do_layer_norm_before: bool = True
    final_layer_norm: bool = True  # do_layer_norm_before and not _remove_final_layer_norm
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    activation: str = "relu"
    tie_word_embeddings: bool = True
    layer_norm_eps: float = 1e-5  # torch.nn.LayerNorm's default; OPT's config has no field for it

    family = "opt"

    @classmethod
    def from_hf(cls, hf: dict) -> "OPTConfig":
        act = hf.get("activation_function", "relu")
        if act not in ACTIVATIONS:
            raise NotImplementedError(f"OPT with activation_function={act!r} is not supported "
                                      f"(supported: {', '.join(ACTIVATIONS)})")
        hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
        if hidden % heads:
            raise ValueError(f"OPT hidden_size={hidden} is not divisible by num_attention_heads={heads}")
        pre_ln = hf.get("do_layer_norm_before", True)
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hidden,
            ffn_dim=hf["ffn_dim"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            word_embed_proj_dim=hf.get("word_embed_proj_dim") or hidden,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            do_layer_norm_before=pre_ln,
            final_layer_norm=bool(pre_ln and not hf.get("_remove_final_layer_norm", False)),
            enable_bias=hf.get("enable_bias", True),
            layer_norm_elementwise_affine=hf.get("layer_norm_elementwise_affine", True),
            activation=act,
            tie_word_embeddings=hf.get("tie_word_embeddings", True),
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_kv_heads(self) -> int:
        return self.num_heads

    @property
    def projects_embeddings(self) -> bool:
        return self.word_embed_proj_dim != self.hidden_size

    @property
    def kv_cache_shape(self):
        return self.num_kv_heads, self.head_dim


# Sub-layers in true-sequential order (GPTQ's opt.py): q/k/v see the same input, then out_proj, fc1, fc2.
SEQUENTIAL_GROUPS = (
    ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj"),
    ("self_attn/out_proj",),
    ("fc1",),
    ("fc2",),
)

# HF name -> Flax path. OPTForCausalLM saves under "model.decoder."; a bare OPTModel under "decoder.": both accepted.
_D = r"(?:model\.)?decoder\."
NAME_MAP = (
    Rule(_D + r"embed_tokens\.weight", "embed_tokens/embedding"),
    Rule(_D + r"embed_positions\.weight", "embed_positions/embedding"),
    Rule(_D + r"project_in\.weight", "project_in/kernel", linear=True),
    Rule(_D + r"project_out\.weight", "project_out/kernel", linear=True),
    Rule(_D + r"final_layer_norm\.weight", "final_layer_norm/scale"),
    Rule(_D + r"final_layer_norm\.bias", "final_layer_norm/bias"),
    Rule(r"lm_head\.weight", "lm_head/kernel", linear=True),  # dropped by convert() when tied
    Rule(_D + r"layers\.(\d+)\.self_attn\.(q|k|v|out)_proj\.weight", "layers_{0}/self_attn/{1}_proj/kernel",
         linear=True),
    Rule(_D + r"layers\.(\d+)\.self_attn\.(q|k|v|out)_proj\.bias", "layers_{0}/self_attn/{1}_proj/bias"),
    Rule(_D + r"layers\.(\d+)\.(self_attn_layer_norm|final_layer_norm)\.weight", "layers_{0}/{1}/scale"),
    Rule(_D + r"layers\.(\d+)\.(self_attn_layer_norm|final_layer_norm)\.bias", "layers_{0}/{1}/bias"),
    Rule(_D + r"layers\.(\d+)\.(fc1|fc2)\.weight", "layers_{0}/{1}/kernel", linear=True),
    Rule(_D + r"layers\.(\d+)\.(fc1|fc2)\.bias", "layers_{0}/{1}/bias"),
)


class PlainLayerNorm(nn.Module):
    """LayerNorm without learnable parameters (HF ``layer_norm_elementwise_affine=False``)."""

    eps: float = 1e-5

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = permuted_input(self, x).astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        return ((x32 - mean) * jax.lax.rsqrt(var + self.eps)).astype(x.dtype)


def layer_norm(c: OPTConfig, dtype):
    return LayerNorm(c.layer_norm_eps, dtype) if c.layer_norm_elementwise_affine else PlainLayerNorm(c.layer_norm_eps)


class Attention(AttentionModule):
    config: OPTConfig
    dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        self.q_proj = Linear(c.hidden_size, c.enable_bias, self.dtype)
        self.k_proj = Linear(c.hidden_size, c.enable_bias, self.dtype)
        self.v_proj = Linear(c.hidden_size, c.enable_bias, self.dtype)
        self.out_proj = Linear(c.hidden_size, c.enable_bias, self.dtype)

    def __call__(self, x, cache=None, cache_index=None, kv_mask=None):
        c = self.config
        b, t, _ = x.shape
        # HF scales q right after the projection (then attends with scale 1.0); same order here, which matters in fp16.
        q = (self.q_proj(x) * (c.head_dim ** -0.5)).reshape(b, t, c.num_heads, c.head_dim)
        k = self.k_proj(x).reshape(b, t, c.num_heads, c.head_dim)
        v = self.v_proj(x).reshape(b, t, c.num_heads, c.head_dim)
        out, cache = cached_attention(q, k, v, cache, cache_index, kv_mask, self.attention_activation, scale=1.0)
        return self.out_proj(out.reshape(b, t, -1)), cache


class DecoderLayer(nn.Module):
    config: OPTConfig
    dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        self.self_attn_layer_norm = layer_norm(c, self.dtype)
        self.self_attn = Attention(c, self.dtype)
        self.final_layer_norm = layer_norm(c, self.dtype)
        self.fc1 = Linear(c.ffn_dim, c.enable_bias, self.dtype)
        self.fc2 = Linear(c.hidden_size, c.enable_bias, self.dtype)

    def __call__(self, h, positions, cache=None, cache_index=None, kv_mask=None):
        del positions  # OPT's positions enter once, through the learned embedding
        pre_ln = self.config.do_layer_norm_before
        x = self.self_attn_layer_norm(h) if pre_ln else h
        attn, cache = self.self_attn(x, cache, cache_index, kv_mask)
        h = residual_stream(h + attn)
        if not pre_ln:
            h = self.self_attn_layer_norm(h)
        x = self.final_layer_norm(h) if pre_ln else h
        h = residual_stream(h + self.fc2(ACTIVATIONS[self.config.activation](self.fc1(x))))
        if not pre_ln:
            h = self.final_layer_norm(h)
        return h, cache


class OPTForCausalLM(CausalLM):
    """``__call__(ids [B,T], positions [B,T]?, cache?, cache_index?, kv_mask?) -> (logits [B,T,V] f32, cache)``.

    ``positions`` are 0-based token positions (what HF derives as ``cumsum(attention_mask) - 1``); the table lookup
    adds OPT's offset of 2 itself.
    """

    config: OPTConfig
    dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        self.embed_tokens = Embed(c.vocab_size, c.word_embed_proj_dim, self.dtype)
        self.embed_positions = Embed(c.max_position_embeddings + POSITION_OFFSET, c.hidden_size, self.dtype)
        if c.projects_embeddings:
            self.project_in = Linear(c.hidden_size, False, self.dtype)
            self.project_out = Linear(c.word_embed_proj_dim, False, self.dtype)
        self.layers = [DecoderLayer(c, self.dtype) for _ in range(c.num_layers)]
        if c.final_layer_norm:
            self.final_layer_norm = layer_norm(c, self.dtype)
        if not c.tie_word_embeddings:
            self.lm_head = Linear(c.vocab_size, False, self.dtype)

    def embed(self, ids, positions):
        h = self.embed_tokens(ids)
        if self.config.projects_embeddings:
            h = self.project_in(h)
        return h + self.embed_positions(positions + POSITION_OFFSET).astype(h.dtype)

    def head(self, h):
        c = self.config
        if c.final_layer_norm:
            h = self.final_layer_norm(h)
        if c.projects_embeddings:
            h = self.project_out(h)
        logits = self.embed_tokens.attend(h) if c.tie_word_embeddings else self.lm_head(h)
        return logits.astype(jnp.float32)


CONFIG = OPTConfig
MODEL = OPTForCausalLM
IGNORED_WEIGHTS = ()
