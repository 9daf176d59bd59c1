"""Building blocks shared by the model families: linear layers that accept quantized weights, norms, RoPE, attention.

The one seam with the quantization package: a linear layer's ``kernel`` is either a dense ``[in, out]`` array or any
pytree with ``matmul(x) -> x @ W`` (and ``shape == (in, out)``). The model never asks which method produced it.

KV cache layout (per layer): ``{"k": [B, S, KV, D], "v": [B, S, KV, D]}`` with ``S`` the cache capacity. A forward
with a cache writes the new keys/values at ``cache_index`` and attends to every slot ``j <= cache_index + t`` for
which ``kv_mask[b, j]`` is true (False for left padding).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from functools import partial
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_dtype(dtype) -> Any:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unsupported dtype {dtype!r}; choose one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    return jnp.dtype(dtype).type if dtype is not None else jnp.float32


@partial(jax.tree_util.register_dataclass, data_fields=["x", "scale"], meta_fields=["eps"])
@dataclasses.dataclass(frozen=True)
class NormedInput:
    """An RMSNorm not applied yet: its input ``x [..., C]``, ``scale [C]`` and ``eps``. A norm hands this to a
    linear whose quantized kernel applies the norm itself while it stages its activations (``fuses_rms_norm``, the
    GPTQ kernel weight): at decode that saves the norm's two XLA kernels. Everything else takes ``as_array``."""

    x: jax.Array
    scale: jax.Array
    eps: float

    @property
    def shape(self):
        return self.x.shape

    def value(self) -> jax.Array:
        return rms_norm(self.x, self.scale, self.eps)


def _swiglu_slots(x) -> bool:
    """Whether x is a ``pallas_kernels.gptq_matmul.SwiGLUSlots`` (``swiglu_input``; by name: the models do not
    import the kernels unless they use them)."""
    return type(x).__name__ == "SwiGLUSlots"


def _deferred(x) -> bool:
    """Whether x is an input not computed yet: a NormedInput, or a SwiGLUSlots."""
    return isinstance(x, NormedInput) or _swiglu_slots(x)


def as_array(x):
    """x itself, or the value of a deferred input (a NormedInput's normalised x, a SwiGLUSlots' SiLU(gate) * up)."""
    return x.value() if _deferred(x) else x


def matmul(x, kernel, partial_sums=False):
    """``x @ kernel`` for a dense kernel, or the quantized weight's own matmul (reference path or Pallas kernel);
    x may be a NormedInput (the kernel applies the norm where it can) or a SwiGLUSlots (the kernel computes it where
    it can). ``partial_sums`` (True or a slot layout, ``gptq_matmul.slot_layout``): a kernel that leaves float32
    partial slots may return them unsummed (``pallas_kernels.gptq_matmul.PartialSums``; ``dense_output`` sums)."""
    kw = {"partial_sums": partial_sums} if partial_sums and getattr(kernel, "takes_partial_sums", False) else {}
    if isinstance(x, NormedInput) and getattr(kernel, "fuses_rms_norm", False):
        return kernel.matmul(x.x, rms_norm=(x.scale, x.eps), **kw)
    if _swiglu_slots(x) and getattr(kernel, "takes_swiglu_slots", False):
        return kernel.matmul(x, **kw)
    x = as_array(x)
    if hasattr(kernel, "matmul"):
        return kernel.matmul(x, **kw)
    return jnp.matmul(x, kernel.astype(x.dtype))


# On by default; "0" makes a fused q/k/v projection hand the decode-attention kernel its summed output instead of its
# partial slots (the same-run comparison in bench/results/decode_step_levers.md).
QKV_PARTIAL_SUMS = os.environ.get("JAXQUANT_QKV_PARTIAL_SUMS", "1") != "0"


def decode_partial_sums(t: int) -> bool:
    """Whether a fused q/k/v projection over t positions hands its partial slots on (``Linear(partial_sums=...)``):
    at decode steps, where the attention kernel sums them itself."""
    return t == 1 and QKV_PARTIAL_SUMS


def swiglu_slots_layout(module: nn.Module, lead: tuple, *down_path: str):
    """The ``partial_sums`` a fused gate/up projection over rows ``lead`` passes (``Linear(partial_sums=...)``):
    "mn" where the down projection at ``down_path`` below ``module`` computes SiLU(gate) * up from those slots
    while staging its activations (``takes_swiglu_slots``, off with JAXQUANT_SWIGLU_STAGING=0; the kernels do so at
    M < 8), else False."""
    if not 1 <= math.prod(lead) < 8:
        return False
    return "mn" if getattr(_kernel_at(module, *down_path), "takes_swiglu_slots", False) else False


def swiglu_input(gate_up, inter: int, lead: tuple):
    """SiLU(gate) * up [*lead, inter] of a fused [gate | up] projection's output: a SwiGLUSlots when the output is
    partial slots (the down projection's kernel may compute it itself), else the XLA value."""
    if partial_slots(gate_up) is None:
        return jax.nn.silu(gate_up[..., :inter]) * gate_up[..., inter:]
    from pallas_kernels.gptq_matmul import SwiGLUSlots

    return SwiGLUSlots(gate_up, inter, tuple(lead))


def partial_slots(y):
    """The float32 partial slots of a Linear's output when it is a PartialSums, else None."""
    return getattr(y, "partials", None)


def dense_output(y, lead: tuple) -> jax.Array:
    """A Linear's output as an array [*lead, N]: y itself, or the sum of a PartialSums' slots."""
    return y if partial_slots(y) is None else y.value().reshape(*lead, -1)


def _kernel_at(module: nn.Module, *path: str):
    """The ``kernel`` parameter of the linear at ``path`` below ``module``, or None."""
    tree = module.variables.get("params", {})
    for name in path:
        tree = tree.get(name, {}) if hasattr(tree, "get") else {}
    return tree.get("kernel") if hasattr(tree, "get") else None


def fuses_rms_norm(module: nn.Module, *path: str) -> bool:
    """Whether the linear at ``path`` below ``module`` holds a kernel that applies an RMSNorm itself
    (``fuses_rms_norm``): only then does the norm before it pass a NormedInput."""
    return bool(getattr(_kernel_at(module, *path), "fuses_rms_norm", False))


class Linear(nn.Module):
    """``y = x @ kernel + bias`` with ``kernel [in, out]``; the kernel may be a quantized-weight pytree.

    The inputs are sown into the ``intermediates`` collection (a no-op unless it is mutable), which is how the
    quantization pipeline collects Hessians without knowing the model's structure.
    """

    features: int
    use_bias: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, partial_sums=False):
        """``partial_sums`` (no bias): the kernel's unsummed partial slots where it leaves them (``matmul``)."""
        if self.has_variable("params", "kernel"):
            # get_variable, not param: flax checks a param's shape against its initializer, and a quantized kernel is
            # a pytree of packed arrays whose leaves have other shapes.
            kernel = self.get_variable("params", "kernel")
        else:
            kernel = self.param("kernel", nn.initializers.normal(0.02), (x.shape[-1], self.features), self.dtype)
        self.sow("intermediates", "inputs", as_array(x))  # dropped by XLA unless intermediates is mutable
        y = matmul(x, kernel, False if self.use_bias else partial_sums)
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), self.dtype)
            y = y + bias.astype(y.dtype)
        return y


def permuted_input(norm: nn.Module, x: jax.Array) -> jax.Array:
    """A norm with an ``input_perm`` parameter (int32 ``[C]``, written by RPTQ's folding) reads its input channels in
    that order, so its output comes out permuted; without one (the default) nothing changes."""
    if norm.has_variable("params", "input_perm"):
        return jnp.take(x, norm.get_variable("params", "input_perm"), axis=-1)
    return x


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    # HF LLaMA casts back to the input dtype before multiplying by the weight.
    return scale.astype(x.dtype) * x32.astype(x.dtype)


class RMSNorm(nn.Module):
    eps: float = 1e-6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deferred: bool = False):
        """The normalised x, or with ``deferred`` (the consumer's kernel applies it, ``fuses_rms_norm``) a
        NormedInput; a norm with an ``input_perm`` is always applied here."""
        permuted = self.has_variable("params", "input_perm")
        x = permuted_input(self, x)
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.dtype)
        if deferred and not permuted:
            return NormedInput(x, scale, self.eps)
        return rms_norm(x, scale, self.eps)


class LayerNorm(nn.Module):
    eps: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = permuted_input(self, x)
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.dtype)
        bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],), self.dtype)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


class Embed(nn.Module):
    num_embeddings: int
    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        table = self.param("embedding", nn.initializers.normal(0.02), (self.num_embeddings, self.features), self.dtype)
        return jnp.take(table, ids, axis=0)

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied output projection: ``x @ embedding.T``."""
        table = self.get_variable("params", "embedding")
        return jnp.matmul(x, table.astype(x.dtype).T)


# ----------------------------------------------------------------------------------------------------------- RoPE
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_parameters(hf: dict) -> dict:
    """Normalise the two ways HF configs describe RoPE (``rope_theta`` + ``rope_scaling``, or ``rope_parameters``)."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or {}
    params.update({k: v for k, v in scaling.items() if k not in params})
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    params.setdefault("rope_type", "default")
    params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    if params["rope_type"] not in SUPPORTED_ROPE_TYPES:
        raise NotImplementedError(
            f"rope_type {params['rope_type']!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    return params


def rope_inverse_frequencies(rotary_dim: int, rope: dict):
    """Inverse frequencies as HF computes them, for the rope types in ``SUPPORTED_ROPE_TYPES``."""
    import numpy as np

    inv_freq = 1.0 / (rope["rope_theta"] ** (np.arange(0, rotary_dim, 2, dtype=np.int64).astype(np.float32) / rotary_dim))
    kind = rope["rope_type"]
    if kind == "linear":
        inv_freq = inv_freq / rope["factor"]
    elif kind == "llama3":
        factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        old_ctx = rope["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled)
    return np.asarray(inv_freq, np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq) -> jax.Array:
    """Rotate-half RoPE (HF convention). x: [B, T, H, D]; positions: [B, T]; rotates the first 2*len(inv_freq) dims."""
    rot = 2 * inv_freq.shape[0]
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]  # [B, T, rot/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B, T, 1, rot]
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    x1, x2 = x_rot[..., : rot // 2], x_rot[..., rot // 2:]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    out = (x_rot.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)
    return jnp.concatenate([out, x_pass], axis=-1) if x_pass.shape[-1] else out


# ------------------------------------------------------------------------------------------------------ attention
ATTENTION_ACTIVATIONS = ("q", "k", "v", "probs")


class AttentionModule(nn.Module):
    """Base of the families' attention modules: ``attention_activation`` is the seam through which activation
    quantization (RPTQ) reaches q, k, v and the probabilities, by a Flax method interceptor on that method name."""

    def attention_activation(self, name: str, x: jax.Array) -> jax.Array:
        """Identity (no parameters, no ops). ``name`` is one of ``ATTENTION_ACTIVATIONS``: "q" [B, T, H, D] as it
        enters Q K^T (after RoPE / scaling), "k" and "v" [B, T, KV, D] before they are written to the cache,
        "probs" [B, KV, G, T, S] float32 softmax output before P V; in the block-causal path (no cache) it is called
        once per block of query rows, [B, KV, G, rows, keys so far], so a "probs" hook must be elementwise."""
        return x


def update_cache(cache: Optional[dict], k: jax.Array, v: jax.Array, cache_index, act=None):
    """Write new keys/values into the cache; returns (keys, values, new_cache). Without a cache, passes through.
    ``act(name, x)``: applied to the new k and v first (so a quantized cache holds the quantized values)."""
    if act is not None:
        k, v = act("k", k), act("v", v)
    if cache is None:
        return k, v, None
    idx = jnp.asarray(cache_index, jnp.int32)
    zero = jnp.zeros((), jnp.int32)
    ck = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (zero, idx, zero, zero))
    cv = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (zero, idx, zero, zero))
    return ck, cv, {"k": ck, "v": cv}


def attention_mask(q_len: int, kv_len: int, cache_index=None, kv_mask=None) -> Optional[jax.Array]:
    """Boolean [B or 1, 1, T, S] mask: causal (offset by cache_index) and, if given, the key padding mask.

    ``None`` for plain causal self-attention (no cache, no padding, ``T == S``): ``dot_product_attention`` then skips
    the masked upper triangle block by block instead of computing and discarding it."""
    if cache_index is None and kv_mask is None and q_len == kv_len:
        return None
    offset = 0 if cache_index is None else jnp.asarray(cache_index, jnp.int32)
    q_pos = offset + jnp.arange(q_len)[:, None]
    k_pos = jnp.arange(kv_len)[None, :]
    mask = (k_pos <= q_pos)[None, None]
    if kv_mask is not None:
        mask = mask & kv_mask[:, None, None, :kv_len].astype(bool)
    return mask


CAUSAL_BLOCK = 128  # query rows per block of the causal path (measured on 2 CPU cores: 128 and 256 fastest)


def causal_block() -> Optional[int]:
    """Query rows per block of the mask-free causal path, or ``None`` for one masked pass.

    Blocks skip the masked upper triangle (2.5x faster on CPU), but each block has its own shapes, hence its own
    GEMM programs: on a GPU the 16 blocks of a 2048-token window made the attention the slowest compile of the
    quantization pipeline, for a few percent of a 7B layer's flops (bench/results/quant_pipeline.md). So blocks
    only on the CPU backend."""
    return CAUSAL_BLOCK if jax.default_backend() == "cpu" else None


# On by default; "0" turns it off (the same-run comparison in bench/results/decode.md).
DECODE_ATTENTION_BARRIER = os.environ.get("JAXQUANT_DECODE_ATTENTION_BARRIER", "1") != "0"


def dot_product_attention(q, k, v, mask, scale: Optional[float] = None, act=None) -> jax.Array:
    """Grouped-query attention. q: [B, T, H, D]; k, v: [B, S, KV, D] with H % KV == 0; mask: [B|1, 1, T, S], or
    ``None`` for plain causal self-attention (``T == S``).
    ``act(name, x)``: applied to q and to the probabilities (k and v go through it in ``update_cache``).

    Scores and softmax in float32 (as HF does for fp16/bf16 models); output in q's dtype, shape [B, T, H, D].
    """
    b, t, h, d = q.shape
    scale = (1.0 / math.sqrt(d)) if scale is None else scale
    if act is not None:
        q = act("q", q)
    if mask is None:
        block = causal_block()
        if block is not None and t > block:
            # Query block i only needs keys [0, end_i): the skipped keys are masked anyway (their softmax weight is
            # exactly 0), so this is the same result at ~half the work (2.5x faster on a 2048-token window on CPU).
            outs = []
            for start in range(0, t, block):
                end = min(start + block, t)
                outs.append(_attend(q[:, start:end], k[:, :end], v[:, :end], _causal(end - start, end, start), scale,
                                    act))
            return jnp.concatenate(outs, axis=1)
        mask = _causal(t, t, 0)
    return _attend(q, k, v, mask, scale, act)


def _causal(q_len: int, kv_len: int, q_offset: int) -> jax.Array:
    return (jnp.arange(kv_len)[None, :] <= q_offset + jnp.arange(q_len)[:, None])[None, None]


def _attend(q, k, v, mask, scale: float, act) -> jax.Array:
    b, t, h, d = q.shape
    kv = k.shape[2]
    g = h // kv
    # [B, KV, G*T, D] @ [B, KV, D, S]: two plain batched matmuls (measured ~2x faster on CPU than 5-D einsums).
    qg = q.reshape(b, t, kv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, d)
    scores = jnp.matmul(qg, k.astype(q.dtype).transpose(0, 2, 3, 1), preferred_element_type=jnp.float32)
    scores = scores.reshape(b, kv, g, t, -1) * scale
    scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    if act is not None:
        probs = act("probs", probs)
    probs = probs.astype(q.dtype).reshape(b, kv, g * t, -1)
    out = jnp.matmul(probs, v.astype(q.dtype).transpose(0, 2, 1, 3))  # [B, KV, G*T, D]
    if t == 1 and DECODE_ATTENTION_BARRIER:
        # A decode step's P @ V is a reduction over the cache; without the barrier XLA may fuse it into a consumer
        # that gathers its input (act-order / SpQR o_proj), where every gathered element recomputes it serially.
        out = jax.lax.optimization_barrier(out)
    return out.reshape(b, kv, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


# On by default; "0" turns it off (the same-run comparison in bench/results/decode_step_levers.md).
RESIDUAL_BARRIER = os.environ.get("JAXQUANT_RESIDUAL_BARRIER", "1") != "0"


def residual_stream(h: jax.Array) -> jax.Array:
    """The residual stream after a layer's add, materialised at a decode step (T = 1). Without the barrier XLA
    fuses each add (with the linear's stream-K partial sums) into the next layer's add and recomputes the chain of
    several layers there: in a LLaMA-7B GPTQ decode step the 64 adds took ~164 us instead of ~85
    (bench/NOTES_kernels.md, "Decode-step levers")."""
    if RESIDUAL_BARRIER and h.ndim == 3 and h.shape[1] == 1:
        return jax.lax.optimization_barrier(h)
    return h


# The decode-step attention kernel (pallas_kernels.decode_attention) on GPU: on by default; "0" turns it off (the
# same-run comparisons in bench/results/decode_attention_ab.md). Measured against XLA and cuDNN at 81-4096 cache
# slots, batch 1 and 16 (bench/results/decode_attention_kernel.md): faster at every point, so no size rule beyond
# what the kernel takes (``decode_attention.fits``).
DECODE_ATTENTION_KERNEL = os.environ.get("JAXQUANT_DECODE_ATTENTION_KERNEL", "1") != "0"


@contextlib.contextmanager
def xla_decode_attention():
    """Within it, :func:`cached_attention` keeps the XLA path at decode steps too (references, A/B runs). The choice
    is made when a forward is traced: a jitted function already traced outside keeps its cached program, so make
    the choice part of its cache key (a static argument), or enter this inside the traced function, as
    ``bench/decode.py``'s ``guard_forward`` does."""
    global DECODE_ATTENTION_KERNEL
    old, DECODE_ATTENTION_KERNEL = DECODE_ATTENTION_KERNEL, False
    try:
        yield
    finally:
        DECODE_ATTENTION_KERNEL = old


def decode_kernel_ok(q, cache, rope_dims: int = 0) -> bool:
    """Whether :func:`cached_attention` runs the Pallas decode kernel: one new token, a cache, a GPU, no method
    interceptor (an ``attention_activation`` hook, e.g. RPTQ's, must see q / k / v / the probabilities, which the
    kernel keeps inside), and sizes the kernel takes."""
    if not DECODE_ATTENTION_KERNEL or cache is None or q.shape[1] != 1 or jax.default_backend() != "gpu":
        return False
    if nn.module._global_interceptor_stack:  # flax's own check for active interceptors
        return False
    from pallas_kernels import decode_attention as da

    _, _, h, d = q.shape
    _, s, kv, _ = cache["k"].shape
    return q.dtype == cache["k"].dtype and da.fits(h, kv, s, d, q.dtype, cache["k"].dtype, rope_dims) is None


def cached_attention(q, k, v, cache, cache_index, kv_mask, act, scale: Optional[float] = None, rope=None,
                     fused_qkv=None):
    """A family's attention after its projections: RoPE, cache write and ``dot_product_attention`` in XLA, or at a
    decode step (``decode_kernel_ok``) all three in one Pallas kernel.

    q [B, T, H, D], k / v [B, T, KV, D]; ``rope``: (positions [B, T], inv_freq) to rotate q and k here (so the
    kernel can do it itself), None if they already are. ``fused_qkv``: (qkv [B, T, F], (oq, ok, ov)) when q, k and v
    are slices of one projection output at those feature offsets: the kernel then reads them from it, with no XLA
    slice between; qkv may be that projection's PartialSums (``Linear(partial_sums=True)``), whose slots the kernel
    sums itself. Returns (out [B, T, H, D], new cache)."""
    b, t, h, d = q.shape
    inv_freq = None if rope is None else jnp.asarray(rope[1], jnp.float32)
    if decode_kernel_ok(q, cache, 0 if inv_freq is None else 2 * inv_freq.shape[0]):
        from pallas_kernels import decode_attention as da

        if fused_qkv is not None:  # the projection's output, or its partial slots (the kernel sums them)
            src, offsets = fused_qkv
            flat = src.reshape(b, -1) if partial_slots(src) is None else partial_slots(src)
            sources = (flat, flat, flat)
        else:
            sources, offsets = (q.reshape(b, -1), k.reshape(b, -1), v.reshape(b, -1)), (0, 0, 0)
        positions = None if rope is None else rope[0].reshape(b)
        out, ck, cv = da.decode_attention(*sources, cache["k"], cache["v"], cache_index, kv_mask, positions, inv_freq,
                                          num_heads=h, offsets=offsets, scale=scale)
        return out.reshape(b, 1, h, d), {"k": ck, "v": cv}
    if rope is not None:
        q, k = apply_rope(q, rope[0], rope[1]), apply_rope(k, rope[0], rope[1])
    k, v, cache = update_cache(cache, k, v, cache_index, act=act)
    mask = attention_mask(t, k.shape[1], cache_index, kv_mask)
    return dot_product_attention(q, k, v, mask, scale=scale, act=act), cache


def init_cache(num_layers: int, batch: int, capacity: int, kv_heads: int, head_dim: int, dtype) -> list:
    shape = (batch, capacity, kv_heads, head_dim)
    return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(num_layers)]


# ------------------------------------------------------------------------------------------------------ the stack
class CausalLM(nn.Module):
    """Shared forward of every family: ``embed -> layers_0..N-1 -> head``.

    Subclasses define ``setup`` (with ``self.layers``), ``embed(ids, positions)`` and ``head(h)``. The quantization
    pipeline uses the same three pieces one at a time, so a family only has to get them right once.
    ``__call__(ids [B,T], positions [B,T]?, cache?, cache_index?, kv_mask?) -> (logits [B,T,V] float32, cache)``.
    """

    def __call__(self, ids, positions=None, cache=None, cache_index=None, kv_mask=None):
        if positions is None:
            start = 0 if cache_index is None else cache_index
            positions = jnp.broadcast_to(start + jnp.arange(ids.shape[1]), ids.shape)
        h = self.embed(ids, positions)
        new_cache = []
        for i, layer in enumerate(self.layers):
            h, layer_cache = layer(h, positions, None if cache is None else cache[i], cache_index, kv_mask)
            new_cache.append(layer_cache)
        return self.head(h), (new_cache if cache is not None else None)

    def dummy_inputs(self):
        return (jnp.zeros((1, 1), jnp.int32),)
