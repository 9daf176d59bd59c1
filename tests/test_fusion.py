"""jaxquant.fusion: q/k/v and gate/up fused into one linear each give the unfused model's logits (CPU, reference
path), for dense, GPTQ (act-order), SqueezeLLM (with outliers) and SpQR weights; unfusable groups stay unfused."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models.llama as llama
from jaxquant.formats import UniformQuantizedWeight
from jaxquant.formats_lut import LUTQuantizedWeight
from jaxquant.formats_spqr import SpQRWeight
from jaxquant.fusion import FusionError, concat_outputs, fuse_projections
from jaxquant.sparse import csr_from_mask
from conftest import jit_logits  # noqa: E402

# GQA (2 KV heads of 4), so q's outputs (128) differ from k's / v's (64).
CFG = llama.LlamaConfig(vocab_size=96, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=32, attention_bias=True)
PARTS = {"self_attn": ("q_proj", "k_proj", "v_proj"), "mlp": ("gate_proj", "up_proj")}


def act_order_g_idx(rng, k, group):
    """g_idx of an act-order solve: column perm[j] belongs to group j // group."""
    g_idx = np.empty(k, np.int32)
    g_idx[rng.permutation(k)] = np.arange(k) // group
    return g_idx


def gptq_weight(rng, k, n, g_idx, bits=4):
    G = int(g_idx.max()) + 1
    return UniformQuantizedWeight.from_codes(
        rng.integers(0, 2**bits, (n, k)), rng.uniform(0.01, 0.03, (G, n)).astype(np.float16),
        rng.integers(0, 2**bits, (G, n)), g_idx, bits=bits, group_size=64, sym=False)


def lut_weight(rng, k, n, bits=3, nnz=6):
    mask = np.zeros(n * k, bool)
    mask[rng.choice(n * k, nnz, replace=False)] = True
    lut = np.sort(rng.standard_normal((n, 2**bits)) * 0.1, axis=1)
    return LUTQuantizedWeight.from_codes(rng.integers(0, 2**bits, (n, k)), lut,
                                         csr_from_mask(rng.standard_normal((n, k)) * 0.3, mask.reshape(n, k)),
                                         bits=bits)


def spqr_weight(rng, k, n, perm, nnz=6):
    gs = qqg = 16
    G = k // gs
    mask = np.zeros(n * k, bool)
    mask[rng.choice(n * k, nnz, replace=False)] = True
    scale_qq = np.stack([rng.uniform(2e-3, 4e-3, (G, n // qqg)), rng.uniform(-3, -1, (G, n // qqg))], -1)
    zero_qq = np.stack([rng.uniform(0.1, 0.5, (G, n // qqg)), rng.uniform(-2, 0, (G, n // qqg))], -1)
    return SpQRWeight.from_parts(rng.integers(0, 8, (n, k)), rng.integers(0, 8, (G, n)), rng.integers(0, 8, (G, n)),
                                 scale_qq.astype(np.float16), zero_qq.astype(np.float16),
                                 csr_from_mask(rng.standard_normal((n, k)) * 0.3, mask.reshape(n, k)), perm,
                                 bits=3, group_size=gs, qq_scale_bits=3, qq_zero_bits=3, qq_groupsize=qqg)


def random_params(rng, kind):
    """Unfused tiny LLaMA params: dense biases / norms / embeddings from init, every decoder linear in ``kind``;
    linears reading the same input share their input-side layout (g_idx / perm), as one Hessian gives."""
    module = llama.LlamaForCausalLM(CFG, dtype=jnp.float32)
    params = jax.tree_util.tree_map(lambda a: np.asarray(a), module.init(jax.random.PRNGKey(0),
                                                                        jnp.zeros((1, 1), jnp.int32))["params"])
    params = jax.tree_util.tree_map(lambda a: (rng.standard_normal(a.shape) * 0.1).astype(np.float32), params)
    for i in range(CFG.num_layers):
        layer = params[f"layers_{i}"]
        for parent, names in list(PARTS.items()) + [("self_attn", ("o_proj",)), ("mlp", ("down_proj",))]:
            k = layer[parent][names[0]]["kernel"].shape[0]
            shared = dict(g_idx=act_order_g_idx(rng, k, 64), perm=rng.permutation(k))
            for name in names:
                n = layer[parent][name]["kernel"].shape[1]
                if kind == "gptq":
                    w = gptq_weight(rng, k, n, shared["g_idx"])
                elif kind == "lut":
                    w = lut_weight(rng, k, n)
                elif kind == "spqr":
                    w = spqr_weight(rng, k, n, shared["perm"])
                else:
                    w = layer[parent][name]["kernel"]
                layer[parent][name]["kernel"] = w
    return module, params


def logits(module, params, ids):
    return np.asarray(jit_logits(module, params, ids), np.float64)  # one compile per parameter-tree layout


def dequantized(w) -> np.ndarray:
    return np.asarray(w if isinstance(w, np.ndarray) else w.dequantize(jnp.float32), np.float64)


@pytest.mark.parametrize("kind", ["dense", "gptq", "lut", "spqr"])
def test_fused_weights_are_the_parts_side_by_side(kind, rng):
    """Every fused weight dequantizes to its parts' dequantized weights concatenated along the outputs (exactly)."""
    _, params = random_params(rng, kind)
    fused, report = fuse_projections(params)
    assert not report["skipped"]
    assert sorted(report["fused"]) == sorted(f"layers_{i}/{p}/{f}" for i in range(CFG.num_layers)
                                             for p, f in (("self_attn", "qkv_proj"), ("mlp", "gate_up_proj")))
    for i in range(CFG.num_layers):
        layer = fused[f"layers_{i}"]
        assert set(layer["self_attn"]) == {"qkv_proj", "o_proj"} and set(layer["mlp"]) == {"gate_up_proj", "down_proj"}
        for parent, name in (("self_attn", "qkv_proj"), ("mlp", "gate_up_proj")):
            parts = [params[f"layers_{i}"][parent][n] for n in PARTS[parent]]
            np.testing.assert_array_equal(dequantized(layer[parent][name]["kernel"]),
                                          np.concatenate([dequantized(p["kernel"]) for p in parts], axis=1))
            if "bias" in parts[0]:
                np.testing.assert_array_equal(layer[parent][name]["bias"], np.concatenate([p["bias"] for p in parts]))


@pytest.mark.parametrize("kind", ["dense", "gptq"])
def test_fused_model_matches_unfused(kind, rng, rel_err):
    """The model splits a fused output into q / k / v and gate / up in the right order (LUT / SpQR weights fuse by the
    same concatenation, checked weight by weight above; their dequantization is slow to compile in a model)."""
    module, params = random_params(rng, kind)
    fused, _ = fuse_projections(params)
    ids = jnp.asarray(rng.integers(0, CFG.vocab_size, (2, 7)), jnp.int32)
    want, got = logits(module, params, ids), logits(module, fused, ids)
    assert rel_err(got, want) < 1e-5, rel_err(got, want)
    # Fused in the wrong order (v, q, k; same total width), the logits change: the comparison above can fail.
    parts = [params["layers_1"]["self_attn"][n]["kernel"] for n in PARTS["self_attn"]]
    wrong = dict(fused["layers_1"]["self_attn"]["qkv_proj"], kernel=concat_outputs([parts[2], parts[0], parts[1]]))
    swapped = dict(fused, layers_1=dict(fused["layers_1"],
                                        self_attn=dict(fused["layers_1"]["self_attn"], qkv_proj=wrong)))
    assert rel_err(logits(module, swapped, ids), want) > 1e-2


def test_fused_kernel_layout_matches_unfused(rng, rel_err):
    """Fusing the stored GPTQ weights, then prepare_for_kernels: the kernel-layout model (reference path on CPU) gives
    the unfused kernel-layout model's logits."""
    from jaxquant.kernel_layout import prepare_for_kernels

    module, params = random_params(rng, "gptq")
    fused, _ = fuse_projections(params)
    ids = jnp.asarray(rng.integers(0, CFG.vocab_size, (1, 5)), jnp.int32)
    a, b = prepare_for_kernels(params), prepare_for_kernels(fused)
    assert type(b["layers_0"]["self_attn"]["qkv_proj"]["kernel"]).__name__ == "GPTQKernelWeight"
    assert rel_err(logits(module, b, ids), logits(module, a, ids)) < 1e-5


def test_unfusable_group_stays_unfused(rng, rel_err):
    module, params = random_params(rng, "gptq")
    attn = params["layers_1"]["self_attn"]
    k = attn["k_proj"]["kernel"]
    # k_proj quantized with another act-order permutation: its g_idx differs, so layer 1's q/k/v cannot be fused.
    attn["k_proj"]["kernel"] = dataclasses.replace(k, g_idx=jnp.asarray(act_order_g_idx(rng, k.in_features, 64)))
    fused, report = fuse_projections(params)
    assert list(report["skipped"]) == ["layers_1/self_attn/qkv_proj"]
    assert "g_idx" in report["skipped"]["layers_1/self_attn/qkv_proj"]
    assert set(fused["layers_1"]["self_attn"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert "qkv_proj" in fused["layers_0"]["self_attn"] and "gate_up_proj" in fused["layers_1"]["mlp"]
    ids = jnp.asarray(rng.integers(0, CFG.vocab_size, (1, 6)), jnp.int32)
    assert rel_err(logits(module, fused, ids), logits(module, params, ids)) < 1e-5


def test_concat_errors_name_the_problem(rng):
    a, b = rng.standard_normal((8, 4)).astype(np.float32), rng.standard_normal((6, 4)).astype(np.float32)
    with pytest.raises(FusionError, match="dense kernels of shapes"):
        concat_outputs([a, b])
    w4 = gptq_weight(rng, 64, 16, np.arange(64, dtype=np.int32) // 64)
    w3 = gptq_weight(rng, 64, 32, np.arange(64, dtype=np.int32) // 64, bits=3)
    with pytest.raises(FusionError, match="bits differs"):
        concat_outputs([w4, w3])
    with pytest.raises(FusionError, match="different kinds"):
        concat_outputs([w4, a])
    with pytest.raises(ValueError, match="not 'opt'"):
        fuse_projections({}, family="opt")


def test_cli_kernel_params(rng, rel_err):
    """`jaxquant generate --kernels`: "on" fuses and converts to the kernel layouts (same logits as the loaded params,
    up to the bfloat16 scales of the kernel layout), "off" and CPU "auto" keep the loaded params, float32 is refused."""
    import types

    from jaxquant.cli import kernel_params

    module, params = random_params(rng, "gptq")
    lm = types.SimpleNamespace(params=params, config=CFG)
    assert kernel_params(lm, "off", "bfloat16") is params
    if jax.default_backend() != "gpu":
        assert kernel_params(lm, "auto", "bfloat16") is params
    with pytest.raises(SystemExit, match="needs --dtype bfloat16 or float16"):
        kernel_params(lm, "on", "float32")
    converted = kernel_params(lm, "on", "bfloat16")
    for i in range(CFG.num_layers):
        attn, mlp = converted[f"layers_{i}"]["self_attn"], converted[f"layers_{i}"]["mlp"]
        assert set(attn) == {"qkv_proj", "o_proj"} and set(mlp) == {"gate_up_proj", "down_proj"}
        assert type(attn["qkv_proj"]["kernel"]).__name__ == "GPTQKernelWeight"
    ids = jnp.asarray(rng.integers(0, CFG.vocab_size, (1, 6)), jnp.int32)
    err = rel_err(logits(module, converted, ids), logits(module, params, ids))
    assert err < 2e-2, err
