"""LLaMA family (LLaMA 1/2/3, SmolLM2, Mistral-style GQA): RMSNorm, RoPE, grouped-query attention, SwiGLU."""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.common import (AttentionModule, CausalLM, Embed, Linear, RMSNorm, as_array, cached_attention,
                           decode_partial_sums, dense_output, fuses_rms_norm, residual_stream,
                           rope_inverse_frequencies, rope_parameters, swiglu_input, swiglu_slots_layout)
from models.weights import Rule


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: tuple = (("rope_theta", 10000.0), ("rope_type", "default"))  # sorted items of the HF rope parameters
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    max_position_embeddings: int = 2048

    family = "llama"

    @classmethod
    def from_hf(cls, hf: dict) -> "LlamaConfig":
        if hf.get("hidden_act", "silu") != "silu":
            raise NotImplementedError(f"LLaMA with hidden_act={hf['hidden_act']!r} is not supported (only silu)")
        heads = hf["num_attention_heads"]
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope=tuple(sorted(rope_parameters(hf).items())),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            attention_bias=hf.get("attention_bias", False),
            mlp_bias=hf.get("mlp_bias", False),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
        )

    @property
    def kv_cache_shape(self):
        return self.num_kv_heads, self.head_dim


# Sub-layers in true-sequential order (the order GPTQ quantizes them inside a decoder layer).
SEQUENTIAL_GROUPS = (
    ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj"),
    ("self_attn/o_proj",),
    ("mlp/up_proj", "mlp/gate_proj"),
    ("mlp/down_proj",),
)

# HF parameter name -> Flax path. "{i}" is the layer index; `linear` kernels are transposed ([out, in] -> [in, out]).
NAME_MAP = (
    Rule(r"model\.embed_tokens\.weight", "embed_tokens/embedding"),
    Rule(r"model\.norm\.weight", "norm/scale"),
    Rule(r"lm_head\.weight", "lm_head/kernel", linear=True),
    Rule(r"model\.layers\.(\d+)\.input_layernorm\.weight", "layers_{0}/input_layernorm/scale"),
    Rule(r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", "layers_{0}/post_attention_layernorm/scale"),
    Rule(r"model\.layers\.(\d+)\.self_attn\.([qkvo])_proj\.weight", "layers_{0}/self_attn/{1}_proj/kernel", linear=True),
    Rule(r"model\.layers\.(\d+)\.self_attn\.([qkvo])_proj\.bias", "layers_{0}/self_attn/{1}_proj/bias"),
    Rule(r"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight", "layers_{0}/mlp/{1}_proj/kernel", linear=True),
    Rule(r"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.bias", "layers_{0}/mlp/{1}_proj/bias"),
)


class Attention(AttentionModule):
    config: LlamaConfig
    dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        # Params with a "qkv_proj" (jaxquant.fusion.fuse_projections, at load time) run q/k/v as one matmul whose
        # outputs are [q | k | v]; per layer, so a layer that could not be fused keeps its three linears.
        self.fused_qkv = self.has_variable("params", "qkv_proj")
        if self.fused_qkv:
            self.qkv_proj = Linear(q + 2 * kv, c.attention_bias, self.dtype)
        else:
            self.q_proj = Linear(q, c.attention_bias, self.dtype)
            self.k_proj = Linear(kv, c.attention_bias, self.dtype)
            self.v_proj = Linear(kv, c.attention_bias, self.dtype)
        self.o_proj = Linear(c.hidden_size, c.attention_bias, self.dtype)
        self.inv_freq = rope_inverse_frequencies(c.head_dim, dict(c.rope))

    def __call__(self, x, positions, cache=None, cache_index=None, kv_mask=None):
        c = self.config
        b, t, _ = x.shape
        fused = None
        if self.fused_qkv:
            q_n, kv_n = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
            # at a decode step the attention kernel reads the projection's partial slots (no XLA sum between)
            out = self.qkv_proj(x, partial_sums=decode_partial_sums(t))
            qkv = dense_output(out, (b, t))
            q, k, v = qkv[..., :q_n], qkv[..., q_n:q_n + kv_n], qkv[..., q_n + kv_n:]
            fused = (out, (0, q_n, q_n + kv_n))
        else:
            x = as_array(x)
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.reshape(b, t, c.num_heads, c.head_dim)
        k = k.reshape(b, t, c.num_kv_heads, c.head_dim)
        v = v.reshape(b, t, c.num_kv_heads, c.head_dim)
        out, cache = cached_attention(q, k, v, cache, cache_index, kv_mask, self.attention_activation,
                                      rope=(positions, self.inv_freq), fused_qkv=fused)
        return self.o_proj(out.reshape(b, t, -1)), cache


class MLP(nn.Module):
    config: LlamaConfig
    dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        # "gate_up_proj" (fused at load time, outputs [gate | up]): one matmul instead of two.
        self.fused_gate_up = self.has_variable("params", "gate_up_proj")
        if self.fused_gate_up:
            self.gate_up_proj = Linear(2 * c.intermediate_size, c.mlp_bias, self.dtype)
        else:
            self.gate_proj = Linear(c.intermediate_size, c.mlp_bias, self.dtype)
            self.up_proj = Linear(c.intermediate_size, c.mlp_bias, self.dtype)
        self.down_proj = Linear(c.hidden_size, c.mlp_bias, self.dtype)

    def __call__(self, x):
        if self.fused_gate_up:  # at decode its partial slots may go to down's kernel, which applies SiLU * up itself
            lead = x.shape[:-1]
            gate_up = self.gate_up_proj(x, partial_sums=swiglu_slots_layout(self, lead, "down_proj"))
            return self.down_proj(swiglu_input(gate_up, self.config.intermediate_size, lead))
        x = as_array(x)
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    config: LlamaConfig
    dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        self.input_layernorm = RMSNorm(c.rms_norm_eps, self.dtype)
        self.self_attn = Attention(c, self.dtype)
        self.post_attention_layernorm = RMSNorm(c.rms_norm_eps, self.dtype)
        self.mlp = MLP(c, self.dtype)

    def __call__(self, h, positions, cache=None, cache_index=None, kv_mask=None):
        # a norm whose linear's kernel applies it (fuses_rms_norm) hands that linear its input and scale instead
        x = self.input_layernorm(h, deferred=fuses_rms_norm(self, "self_attn", "qkv_proj"))
        attn, cache = self.self_attn(x, positions, cache, cache_index, kv_mask)
        h = residual_stream(h + attn)
        x = self.post_attention_layernorm(h, deferred=fuses_rms_norm(self, "mlp", "gate_up_proj"))
        h = residual_stream(h + self.mlp(x))
        return h, cache


class LlamaForCausalLM(CausalLM):
    """``__call__(ids [B,T], positions [B,T]?, cache?, cache_index?, kv_mask?) -> (logits [B,T,V] f32, cache)``."""

    config: LlamaConfig
    dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        self.embed_tokens = Embed(c.vocab_size, c.hidden_size, self.dtype)
        self.layers = [DecoderLayer(c, self.dtype) for _ in range(c.num_layers)]
        self.norm = RMSNorm(c.rms_norm_eps, self.dtype)
        if not c.tie_word_embeddings:
            self.lm_head = Linear(c.vocab_size, False, self.dtype)

    def embed(self, ids, positions):
        return self.embed_tokens(ids)

    def head(self, h):
        h = self.norm(h)
        logits = self.embed_tokens.attend(h) if self.config.tie_word_embeddings else self.lm_head(h)
        return logits.astype(jnp.float32)


CONFIG = LlamaConfig
MODEL = LlamaForCausalLM
IGNORED_WEIGHTS = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)
