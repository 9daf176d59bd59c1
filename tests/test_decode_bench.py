"""bench/decode.py on the CPU: the random-weight model builder, the generation timing protocol and the guard.

The builder must produce each format in its stored layout and hand it to the project's dispatch
(``prepare_for_kernels``); the timing protocol relies on ``eos_id = first token`` stopping the jitted loop after the
prefill; the guard must pass on the dispatched path and fail when a layer's product is wrong.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os

import numpy as np
import pytest

import jax
import jax.numpy as jnp

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "decode.py")
_spec = importlib.util.spec_from_file_location("bench_decode", _PATH)
decode = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(decode)

# Small enough for the CPU; K = 128 / 256 are multiples of the packings (32), GPTQ groups (128), SpQR groups (16).
DIMS = dict(vocab_size=128, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=2, num_kv_heads=2,
            head_dim=64)


def _key(rng):
    return jax.random.PRNGKey(int(rng.integers(0, 2**31)))


def _linear_leaves(params):
    return [leaf for leaf in jax.tree_util.tree_leaves(params, is_leaf=decode._is_weight) if decode._is_weight(leaf)]


@pytest.mark.parametrize("fmt", list(decode.FORMATS))
def test_builder_layouts_scales_and_dispatch(rng, fmt):
    module, params, _, _ = decode.build_model(fmt, _key(rng), DIMS)
    layers = [params[f"layers_{i}"] for i in range(DIMS["num_layers"])]
    classes = decode.weight_classes(params)
    if fmt == "bf16":
        assert classes == [] and decode.path_label(classes) == "bf16 XLA matmul"
        dense = [np.asarray(leaf, np.float64) for layer in layers for leaf in jax.tree_util.tree_leaves(layer)
                 if leaf.ndim == 2]
    else:
        # Every decoder linear is quantized and went through prepare_for_kernels into a kernel layout.
        leaves = [leaf for layer in layers for leaf in _linear_leaves(layer)]
        assert len(leaves) == 7 * DIMS["num_layers"]
        assert all("Kernel" in type(leaf).__name__ for leaf in leaves), classes
        assert decode.path_label(classes).startswith("pallas kernel")
        dense = [np.asarray(leaf.dequantize(jnp.float32), np.float64) for leaf in leaves]
        assert all(d.shape == (leaf.in_features, leaf.out_features) for d, leaf in zip(dense, leaves))
    # Embedding / lm_head stay bf16 arrays; norms are ones.
    assert params["lm_head"]["kernel"].dtype == jnp.bfloat16
    assert np.all(np.asarray(params["norm"]["scale"], np.float64) == 1.0)
    for d in dense:  # the random weights have the intended scale (std ~ WEIGHT_STD), not zeros, no NaN
        assert np.isfinite(d).all()
        assert 0.4 * decode.WEIGHT_STD < d.std() < 2.5 * decode.WEIGHT_STD, d.std()


@pytest.mark.parametrize("bits", [3, 4])
def test_random_packed_words_are_valid_uniform_codes(rng, bits):
    """Random words in the AutoGPTQ packing decode to every code 0..2**bits-1 about equally often (3-bit packing
    uses all 96 bits of 3 words, so any word is valid)."""
    w = decode.random_gptq(_key(rng), 256, 512, bits, 128)
    w.check_shapes()
    for codes in (np.asarray(w.codes()), np.asarray(w.zeros())):
        assert codes.min() == 0 and codes.max() == 2**bits - 1
        counts = np.bincount(codes.ravel(), minlength=2**bits)
        expected = codes.size / 2**bits
        assert np.all(np.abs(counts - expected) < 6 * np.sqrt(expected)), counts
    assert np.array_equal(np.asarray(w.g_idx), np.arange(256) // 128)


def test_spqr_outliers_are_sorted_unique_and_counted(rng):
    K, N = 256, 64
    w = decode.random_spqr(_key(rng), K, N, bits=3, group=16, qq_bits=3, qq_group=16, outliers=0.0086)
    w.check_shapes()  # the format's own validation (CSR, permutation, array shapes)
    cols = np.asarray(w.col_idx, np.int64).reshape(N, -1)
    assert cols.shape[1] == round(0.0086 * K)
    assert np.all(np.diff(cols, axis=1) > 0) and cols.min() >= 0 and cols.max() < K
    dense = np.asarray(w.dequantize(jnp.float32), np.float64)  # [K, N]
    np.testing.assert_array_equal(dense[cols, np.arange(N)[:, None]],
                                  np.asarray(w.values, np.float32).reshape(N, -1))


@pytest.mark.parametrize("fmt", ["bf16", "gptq-w4g128", "squeezellm-w3", "spqr-w3g16"])
def test_fused_builder_fuses_every_layer_with_the_same_values(rng, fmt):
    """``+fused``: every layer holds qkv_proj and gate_up_proj (SpQR's q/k/v and gate/up share their act-order
    permutation, as one Hessian gives), built from the same random values as the unfused model."""
    key = _key(rng)
    _, plain, _, _ = decode.build_model(fmt, key, DIMS, convert=False)
    _, fused, _, report = decode.build_model(fmt + "+fused", key, DIMS, convert=False)
    assert not report["skipped"] and len(report["fused"]) == 2 * DIMS["num_layers"]
    deq = lambda w: np.asarray(w.dequantize(jnp.float32) if decode._is_weight(w) else w, np.float64)  # noqa: E731
    for i in range(DIMS["num_layers"]):
        layer, ref = fused[f"layers_{i}"], plain[f"layers_{i}"]
        assert set(layer["self_attn"]) == {"qkv_proj", "o_proj"} and set(layer["mlp"]) == {"gate_up_proj", "down_proj"}
        np.testing.assert_array_equal(
            deq(layer["mlp"]["gate_up_proj"]["kernel"]),
            np.concatenate([deq(ref["mlp"][n]["kernel"]) for n in ("gate_proj", "up_proj")], axis=1))
    with pytest.raises(ValueError, match="unknown format"):
        decode.parse_format(fmt + "+fuse")


def test_generate_protocol_eos_stops_after_prefill(rng):
    module, params, _, _ = decode.build_model("gptq-w4g128", _key(rng), DIMS)
    prompt = rng.integers(0, DIMS["vocab_size"], 16)
    new = 5
    compiled = decode.compile_generate(module, params, 3, len(prompt), new)
    total, prefill, first, steps, _ = decode.time_generate(compiled, params, prompt, 3, new, reps=1)
    assert steps == new and total > 0 and prefill > 0
    # Oracle for the first token: argmax of a cache-free forward of the same prompt (when not a near tie).
    logits = np.asarray(module.apply({"params": params}, jnp.asarray(prompt, jnp.int32)[None])[0][0, -1], np.float64)
    top2 = np.sort(logits)[-2:]
    if top2[1] - top2[0] > 1e-2 * np.abs(logits).max():
        assert first == int(logits.argmax())
    assert decode.program_peak_bytes(compiled) >= decode.params_bytes(params)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["inner"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class _WrongProduct:
    """A weight whose dequantize is right but whose matmul leaves the first 64 outputs at zero (a kernel that skips
    an output tile)."""

    inner: object

    in_features = property(lambda self: self.inner.in_features)
    out_features = property(lambda self: self.inner.out_features)
    nbytes = property(lambda self: self.inner.nbytes)

    def dequantize(self, dtype=jnp.float32):
        return self.inner.dequantize(dtype)

    def matmul(self, x):
        y = self.inner.matmul(x)
        return y.at[..., :64].set(0)


def test_guard_passes_on_dispatched_path_and_catches_a_wrong_product(rng):
    dims = dict(DIMS, num_layers=1)  # one layer keeps the guard's compiles short; corruptions hit layers_0
    module, params, stored, _ = decode.build_model("gptq-w4g128+fused", _key(rng), dims, keep_stored=True)
    prompt = rng.integers(0, dims["vocab_size"], 16)
    good, corrupted = decode.accuracy_guard(module, params, stored, prompt, _key(rng), corrupt=True)
    assert good["guard_ok"] and good["linear_checks"] == 2 * 4 * dims["num_layers"], good
    # Per linear, the (CPU: reference) path sits at bf16 rounding of the float32 oracle.
    assert 1e-4 < good["linear_max_rel_err"] < 1e-2, good
    assert len(corrupted) == 2 and not any(g["guard_ok"] for g in corrupted), corrupted
    broken = dict(params)
    layer = jax.tree_util.tree_map(lambda x: x, params["layers_0"], is_leaf=decode._is_weight)
    wrong = _WrongProduct(layer["self_attn"]["o_proj"]["kernel"])
    layer["self_attn"] = dict(layer["self_attn"], o_proj={"kernel": wrong})
    broken["layers_0"] = layer
    bad, _ = decode.accuracy_guard(module, broken, stored, prompt, _key(rng))
    assert not bad["guard_ok"] and not bad["linear_ok"] and bad["linear_worst"].startswith("layers_0/self_attn/o_proj")


def test_guard_judges_the_decode_attention_path(rng, monkeypatch):
    """The guard's decode step runs the attention path the models dispatch to, and its XLA-attention reference does
    not: a decode-attention kernel that doubles its output fails the guard (on the CPU the dispatch is forced and the
    kernel's jnp reference stands in for it)."""
    import models.common as mc
    from pallas_kernels import decode_attention as da

    dims = dict(DIMS, num_layers=1)
    module, params, stored, _ = decode.build_model("bf16", _key(rng), dims, keep_stored=True)
    prompt = rng.integers(0, dims["vocab_size"], 16)
    monkeypatch.setattr(mc, "decode_kernel_ok", lambda q, cache, rope_dims=0: (
        mc.DECODE_ATTENTION_KERNEL and cache is not None and q.shape[1] == 1 and q.dtype == cache["k"].dtype))

    def kernel(factor, *args, **kwargs):
        out, ck, cv = da.reference_decode_attention(*args, **kwargs)
        return (out.astype(jnp.float32) * factor).astype(out.dtype), ck, cv

    monkeypatch.setattr(da, "decode_attention", functools.partial(kernel, 1.0))
    good, _ = decode.accuracy_guard(module, params, stored, prompt, _key(rng))
    assert good["attention_ok"] and good["guard_ok"], good
    monkeypatch.setattr(da, "decode_attention", functools.partial(kernel, 2.0))
    jax.clear_caches()  # guard_forward is jitted: retrace it with the broken kernel
    bad, _ = decode.accuracy_guard(module, params, stored, prompt, _key(rng))
    assert not bad["attention_ok"] and not bad["guard_ok"], bad
    assert bad["decode_step_rel_err_vs_xla_attention"] > 10 * good["decode_step_rel_err_vs_xla_attention"], bad


def test_summary_ratios_are_same_run_or_flagged():
    base = dict(what="generate", path="p", avg_bits=None, ms_per_step=1.0, prefill_s=0.01, peak_mem_gb=1.0,
                process_peak_gb=1.0, params_gb=1.0)
    rows = [dict(base, format="bf16", batch=1, tokens_per_s=90.0, run_id="a"),
            dict(base, format="bf16+fused", batch=1, tokens_per_s=100.0, run_id="a"),  # the faster bf16 is the base
            dict(base, format="gptq-w4g128", batch=1, tokens_per_s=250.0, run_id="a", avg_bits=4.25),
            dict(base, format="gptq-w3g128", batch=1, tokens_per_s=300.0, run_id="b", avg_bits=3.25)]
    guard = dict(what="guard", batch=1, guard_ok=True, linear_max_rel_err=0.003, decode_step_rel_err_vs_f32=0.05,
                 bf16_xla_decode_step_rel_err_vs_f32=0.04)
    rows += [dict(guard, format="gptq-w4g128", run_id="a"), dict(guard, format="gptq-w3g128", run_id="c")]
    lines = decode.summarize(rows)
    assert rows[2]["speedup_vs_bf16"] == 2.5
    assert rows[3]["speedup_vs_bf16"] is None  # another run's bf16: not written to the row
    assert any("3.00 (other run)" in line for line in lines)
    # a guard vouches for its own run's rows only
    assert any(line.startswith("| a | gptq-w4g128 |") and line.endswith("| ok (0.003 / 0.05 (0.04)) |")
               for line in lines)
    assert any(line.startswith("| b | gptq-w3g128 |") and line.endswith("| - |") for line in lines)


def test_merge_replaces_rows_but_keeps_the_bf16_a_kept_row_is_compared_to():
    gen = lambda fmt, run, batch=1: dict(what="generate", format=fmt, batch=batch, run_id=run, model_shape="m",
                                         device="d")  # noqa: E731
    kept = [gen("bf16", "a"), gen("bf16", "a", 16), gen("spqr-w3g16+fused", "a"), gen("gptq-w4g128+fused", "a", 16),
            gen("bf16", "old"), gen("gptq-w4g128+fused", "old"),
            dict(what="guard", format="gptq-w4g128+fused", batch=1, run_id="old", model_shape="m", device="d")]
    new = [gen("bf16", "b"), gen("bf16", "b", 16), gen("gptq-w4g128+fused", "b"), gen("gptq-w4g128+fused", "b", 16)]
    merged = decode.merge_rows(kept, new)
    got = [(r["format"], r["run_id"], r["batch"], r["what"]) for r in merged]
    # run a's batch-1 bf16 stays (its spqr row is kept); its batch-16 bf16 goes (its gptq row was replaced); run
    # old's rows are all replaced except the guard, which no new row replaces.
    assert got == [("bf16", "a", 1, "generate"), ("spqr-w3g16+fused", "a", 1, "generate"),
                   ("gptq-w4g128+fused", "old", 1, "guard")] + [(r["format"], "b", r["batch"], "generate")
                                                                 for r in new]
    lines = decode.summarize([dict(r, path="p", avg_bits=None, ms_per_step=1.0, prefill_s=0.01, peak_mem_gb=1.0,
                                   process_peak_gb=1.0, params_gb=1.0, tokens_per_s=100.0 + i)
                              for i, r in enumerate(merged) if r["what"] == "generate"])
    assert any(line.startswith("| a | spqr-w3g16+fused |") and "| 1.01 |" in line for line in lines)


def test_write_outputs_keeps_replaced_rows_on_record(tmp_path):
    """A rewrite of decode.json moves the rows it drops (replaced by a later run) to decode_superseded.json, once
    each, and keeps the rows it still holds out of it."""
    gen = lambda fmt, run, ms: dict(what="generate", format=fmt, batch=1, run_id=run, model_shape="m", device="d",  # noqa: E731
                                    path="p", avg_bits=None, ms_per_step=ms, prefill_s=0.01, peak_mem_gb=1.0,
                                    process_peak_gb=1.0, params_gb=1.0, tokens_per_s=1000.0 / ms)
    first = [gen("bf16", "a", 5.0), gen("gptq-w4g128+fused", "a", 2.0)]
    decode.write_outputs(first, str(tmp_path))
    assert not (tmp_path / "decode_superseded.json").exists()
    second = decode.merge_rows(first, [gen("bf16", "b", 5.1), gen("gptq-w4g128+fused", "b", 2.2)])
    decode.write_outputs(second, str(tmp_path))
    decode.write_outputs(second, str(tmp_path))  # nothing more to move
    old = json.loads((tmp_path / "decode_superseded.json").read_text())
    assert [(r["format"], r["run_id"], r["ms_per_step"]) for r in old] == [("bf16", "a", 5.0),
                                                                         ("gptq-w4g128+fused", "a", 2.0)]
    assert [r["run_id"] for r in json.loads((tmp_path / "decode.json").read_text())] == ["b", "b"]
