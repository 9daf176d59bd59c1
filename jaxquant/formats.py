"""Stored form of a uniformly quantized linear weight (AutoGPTQ / GPTQModel tensors)."""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp

from .packing import check_packable, pack_qweight, pack_qzeros, unpack_qweight, unpack_qzeros


@partial(
    jax.tree_util.register_dataclass,
    data_fields=["qweight", "qzeros", "scales", "g_idx"],
    meta_fields=["bits", "group_size", "sym", "in_features", "out_features"],
)
@dataclasses.dataclass(frozen=True)
class UniformQuantizedWeight:
    """W[k, n] = scales[g, n] * (code[k, n] - zero[g, n]) with g = g_idx[k]; K = in, N = out.

    qzeros holds the plain zero codes (GPTQ "v2" convention). GPTQ "v1" checkpoints (the original
    AutoGPTQ format) store zero - 1 in qzeros; add 1 when importing those.
    """

    qweight: jax.Array  # [K*bits/32, N] int32, codes packed along K
    qzeros: jax.Array  # [G, N*bits/32] int32, zero codes packed along N
    scales: jax.Array  # [G, N]
    g_idx: jax.Array  # [K] int32, group of each input column
    bits: int
    group_size: int  # -1 = per channel (G = 1)
    sym: bool
    in_features: int
    out_features: int

    @classmethod
    def from_codes(cls, codes, scales, zeros, g_idx, *, bits: int, group_size: int, sym: bool):
        """Build from unpacked arrays in the algorithms' (torch) layout.

        codes [N, K] integer codes of W[out, in]; scales, zeros [G, N]; g_idx [K].
        """
        codes = jnp.asarray(codes)
        N, K = codes.shape
        check_packable(K, bits, "in_features")
        check_packable(N, bits, "out_features")
        scales = jnp.asarray(scales)
        G = scales.shape[0]
        if scales.shape != (G, N) or jnp.shape(zeros) != (G, N) or jnp.shape(g_idx) != (K,):
            raise ValueError(
                f"expected scales/zeros [G, {N}] and g_idx [{K}], got {scales.shape}, "
                f"{jnp.shape(zeros)}, {jnp.shape(g_idx)}"
            )
        return cls(
            qweight=pack_qweight(codes.T, bits),
            qzeros=pack_qzeros(jnp.asarray(zeros), bits),
            scales=scales,
            g_idx=jnp.asarray(g_idx, jnp.int32),
            bits=bits,
            group_size=group_size,
            sym=sym,
            in_features=K,
            out_features=N,
        )

    @property
    def shape(self) -> tuple[int, int]:
        return (self.in_features, self.out_features)

    @staticmethod
    def expected_shapes(K: int, N: int, bits: int, group_size: int) -> dict:
        """Shapes of the stored arrays for a K x N (in x out) weight; a short last group counts as a group."""
        G = 1 if group_size == -1 else -(-K // group_size)
        return {"qweight": (K * bits // 32, N), "qzeros": (G, N * bits // 32), "scales": (G, N), "g_idx": (K,)}

    def check_shapes(self) -> None:
        """Raise ValueError if the stored arrays do not fit the static fields (e.g. a corrupt checkpoint)."""
        K, N, b = self.in_features, self.out_features, self.bits
        want = self.expected_shapes(K, N, b, self.group_size)
        for name, shape in want.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ValueError(f"{name} has shape {got}, expected {shape} for a {K}x{N} {b}-bit weight "
                                 f"with group_size {self.group_size}")

    def codes(self) -> jax.Array:
        """Unpacked codes [K, N]."""
        return unpack_qweight(self.qweight, self.bits)

    def zeros(self) -> jax.Array:
        """Unpacked zero codes [G, N]."""
        return unpack_qzeros(self.qzeros, self.bits)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """Dense weight [K, N] (Flax kernel layout), computed in float32 then cast."""
        zero = self.zeros().astype(jnp.float32)[self.g_idx]
        scale = self.scales.astype(jnp.float32)[self.g_idx]
        return (scale * (self.codes().astype(jnp.float32) - zero)).astype(dtype)

    def matmul(self, x: jax.Array) -> jax.Array:
        """x [..., K] -> x @ W [..., N] in x's dtype, accumulated in float32."""
        y = jnp.matmul(
            x,
            self.dequantize(x.dtype),
            preferred_element_type=jnp.float32,
            precision=jax.lax.Precision.HIGHEST,
        )
        return y.astype(x.dtype)

    @property
    def nbytes(self) -> int:
        return sum(a.size * a.dtype.itemsize for a in (self.qweight, self.qzeros, self.scales, self.g_idx))

    def tp_output_specs(self, n_dev: int, axis: str):
        """PartitionSpecs (in this pytree's structure) splitting the output dimension over ``n_dev`` devices on mesh
        axis ``axis``, or None when a device's share of columns is not whole packed words of qzeros."""
        from jax.sharding import PartitionSpec as P

        per_word = 32 if self.bits == 3 else 32 // self.bits  # zero codes per packing unit along N
        if self.out_features % (n_dev * per_word):
            return None
        split = P(None, axis)
        return dataclasses.replace(self, qweight=split, qzeros=split, scales=split, g_idx=P())

    def avg_bits(self) -> float:
        """Stored bits per weight, including scales, zeros and g_idx."""
        return 8 * self.nbytes / (self.in_features * self.out_features)

    @staticmethod
    def output_unit(bits: int) -> int:
        """Output features per run of whole qzeros words: slices along the outputs start at multiples of it."""
        return 32 if bits == 3 else 32 // bits

    def split_outputs(self, sizes) -> list:
        """The weights of consecutive output slices of ``sizes`` (e.g. q/k/v solved as one stacked weight): plain
        slicing of the stored arrays (numpy or jax), so the parts hold exactly the stacked weight's values."""
        unit = self.output_unit(self.bits)
        if sum(sizes) != self.out_features or any(n % unit for n in sizes):
            raise ValueError(f"cannot split {self.out_features} outputs into {list(sizes)}: each part must be a "
                             f"multiple of {unit} ({self.bits}-bit zeros are packed {unit} at a time)")
        import numpy as np

        def cols(a, lo, hi):  # numpy slices are copied: a strided view is not what savers and exporters expect
            part = a[:, lo:hi]
            return np.ascontiguousarray(part) if isinstance(a, np.ndarray) else part

        parts, start = [], 0
        for n in sizes:
            w0, w1 = start * self.bits // 32, (start + n) * self.bits // 32
            parts.append(dataclasses.replace(
                self, qweight=cols(self.qweight, start, start + n), qzeros=cols(self.qzeros, w0, w1),
                scales=cols(self.scales, start, start + n), out_features=n))
            start += n
        return parts

    @classmethod
    def concat_outputs(cls, parts) -> "UniformQuantizedWeight":
        """Inverse of ``split_outputs`` for host (numpy) parts, e.g. the row blocks solved on different devices."""
        import numpy as np

        first = parts[0]
        unit = cls.output_unit(first.bits)
        for p in parts:
            if (p.bits, p.group_size, p.sym, p.in_features) != (first.bits, first.group_size, first.sym,
                                                               first.in_features) or p.out_features % unit:
                raise ValueError("concat_outputs: parts differ in bits/group_size/sym/in_features or have outputs "
                                 f"that are not a multiple of {unit}")
            if not np.array_equal(np.asarray(p.g_idx), np.asarray(first.g_idx)):
                raise ValueError("concat_outputs: parts have different g_idx (not solved with the same Hessian)")
        cat = lambda f: np.concatenate([np.asarray(getattr(p, f)) for p in parts], axis=1)  # noqa: E731
        return dataclasses.replace(first, qweight=cat("qweight"), qzeros=cat("qzeros"), scales=cat("scales"),
                                   g_idx=np.asarray(first.g_idx),
                                   out_features=sum(p.out_features for p in parts))


# Quantized-weight pytrees that checkpoints can store, by class name. Each format lives in its own module (one per
# method family) and registers itself with @register_format; FORMAT_MODULES lists those modules so that loading a
# checkpoint finds every format without importing the methods by hand.
FORMAT_MODULES = ("jaxquant.formats", "jaxquant.formats_spqr", "jaxquant.formats_lut")
_REGISTRY: dict = {}


def register_format(cls):
    """Class decorator: a frozen dataclass pytree with array fields + static fields, ``shape`` (in, out),
    ``check_shapes()``, ``dequantize(dtype)``, ``matmul(x)``, ``nbytes`` and ``avg_bits()``."""
    _REGISTRY[cls.__name__] = cls
    return cls


def all_formats() -> dict:
    """{class name: class} of every registered quantized-weight format."""
    import importlib

    for module in FORMAT_MODULES:
        importlib.import_module(module)
    return dict(_REGISTRY)


register_format(UniformQuantizedWeight)


def quantized_bits(params) -> dict:
    """Stored bits of every quantized kernel in a parameter tree: {"avg_bits", "quantized_params", "stored_bits"}.

    avg_bits = all stored bits of the quantized weights (codes, scales, zeros, indices) / their parameter count.
    """
    leaves = [leaf for leaf in jax.tree_util.tree_leaves(params, is_leaf=lambda x: hasattr(x, "avg_bits"))
              if hasattr(leaf, "avg_bits")]
    count = sum(leaf.in_features * leaf.out_features for leaf in leaves)
    bits = sum(8 * leaf.nbytes for leaf in leaves)
    return {"avg_bits": bits / count if count else None, "quantized_params": count, "stored_bits": bits}
