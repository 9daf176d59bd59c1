"""RPTQ: reorder statistics against numpy, channel clusters, folded permutations (the reordered float model gives the
original logits), per-cluster activation quantizers against a float64 numpy oracle."""
from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant import rptq
from models.common import init_cache

CLUSTERS = {"R1": 8, "R2": 4, "R3": 4, "R4": 8, "R5": 8}  # the tiny models have 64 channels / 16 per head


def _logits(module, params, ids, norm_perms=None):
    """A fresh jit per call: the interceptor is active while tracing, so it must not hit another call's cache."""
    fn = jax.jit(lambda p, x: module.apply({"params": p}, x)[0])
    if norm_perms is None:
        return np.asarray(fn(params, ids))
    with rptq.reordered_norms(norm_perms):
        return np.asarray(fn(params, ids))


def _random_plan(points, rng):
    """Uniformly random permutations (not sorted by anything) at every reorder point."""
    plan = {}
    for p in points:
        perm = np.stack([rng.permutation(p.channels) for _ in range(p.groups)]).astype(np.int32)
        labels = rng.integers(0, 2, (p.groups, p.channels)).astype(np.int32)
        plan[p.name] = rptq.ChannelClusters(labels, perm, np.stack([np.bincount(r, minlength=2) for r in labels]))
    return plan


# ----------------------------------------------------------------------------------------------- statistics
def _rms_norm(x, scale, eps):
    return scale * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


@pytest.mark.parametrize("ema", [None, 0.9])
def test_layer_stats_match_numpy(tiny_hf, rng, ema):
    lm = tiny_hf("llama").loaded
    c = lm.config
    ids = rng.integers(0, c.vocab_size, (3, 2, 12))  # 3 batches of 2 windows
    positions = jnp.broadcast_to(jnp.arange(12), (2, 12))
    inputs = [jnp.asarray(lm.params["embed_tokens"]["embedding"])[b] for b in ids]
    taps = (("in", "self_attn/q_proj"), ("out", "self_attn/q_proj"), ("out", "self_attn/k_proj"))
    layer = lm.family.DecoderLayer(c, lm.dtype)
    got = rptq.layer_stats(layer, lm.params["layers_0"], inputs, positions, taps, ema=ema)

    p = jax.tree.map(lambda a: np.asarray(a, np.float64), lm.params)
    lp = p["layers_0"]
    want = None
    for b in ids:
        x = _rms_norm(p["embed_tokens"]["embedding"][b], lp["input_layernorm"]["scale"], c.rms_norm_eps)
        acts = {taps[0]: x, taps[1]: x @ lp["self_attn"]["q_proj"]["kernel"],
                taps[2]: x @ lp["self_attn"]["k_proj"]["kernel"]}
        new = {t: (a.reshape(-1, a.shape[-1]).max(0), a.reshape(-1, a.shape[-1]).min(0)) for t, a in acts.items()}
        if want is None:
            want = new
        elif ema is None:
            want = {t: (np.maximum(want[t][0], new[t][0]), np.minimum(want[t][1], new[t][1])) for t in taps}
        else:
            want = {t: tuple(ema * w + (1 - ema) * n for w, n in zip(want[t], new[t])) for t in taps}
    for t in taps:
        for g, w in zip(got[t], want[t]):
            np.testing.assert_allclose(np.asarray(g), w, rtol=1e-5, atol=1e-5 * np.abs(w).max(), err_msg=str(t))


def test_point_features_reduce_query_heads_per_kv_head(rng):
    # R2 of a GQA model: 4 query heads over 2 K/V heads of 3 channels; the points of K/V head g take the max (min)
    # over its 2 query heads, then k's: (qmax, kmax, qmin, kmin).
    point = rptq.ReorderPoint("R2", (("out", "q"), ("out", "k")), groups=2, channels=3)
    qmax, qmin, kmax, kmin = (rng.normal(size=n) for n in (12, 12, 6, 6))
    feats = np.asarray(rptq.point_features(point, {("out", "q"): (qmax, qmin), ("out", "k"): (kmax, kmin)}))
    assert feats.shape == (2, 3, 4)
    np.testing.assert_allclose(feats[..., 0], qmax.reshape(2, 2, 3).max(1), rtol=1e-6)
    np.testing.assert_allclose(feats[..., 1], kmax.reshape(2, 3), rtol=1e-6)
    np.testing.assert_allclose(feats[..., 2], qmin.reshape(2, 2, 3).min(1), rtol=1e-6)
    np.testing.assert_allclose(feats[..., 3], kmin.reshape(2, 3), rtol=1e-6)


# ----------------------------------------------------------------------------------------------- clustering
def test_cluster_channels_recovers_separated_groups(rng):
    groups, channels, k = 2, 30, 3
    truth = np.stack([rng.permutation(np.arange(channels) % k) for _ in range(groups)])  # 10 channels per cluster
    centres = rng.normal(size=(groups, k, 2)) * 10
    points = np.take_along_axis(centres, truth[..., None], 1) + 0.01 * rng.normal(size=(groups, channels, 2))
    cl = rptq.cluster_channels(points, k)
    for g in range(groups):
        # same partition as the truth (label names may differ)
        pairs = set(zip(truth[g].tolist(), cl.labels[g].tolist()))
        assert len(pairs) == k
        np.testing.assert_array_equal(np.sort(cl.perm[g]), np.arange(channels))
        sorted_labels = cl.labels[g][cl.perm[g]]
        assert np.all(np.diff(sorted_labels) >= 0), "clusters are not contiguous after the permutation"
        for lab in range(k):  # a cluster keeps its channels' original order
            assert np.all(np.diff(cl.perm[g][sorted_labels == lab]) > 0)
        np.testing.assert_array_equal(cl.counts[g], np.bincount(cl.labels[g], minlength=k))
    ids = cl.cluster_ids(reordered=True)
    assert np.all(np.diff(ids) >= 0) and ids.max() == groups * k - 1


def test_cluster_channels_rejects_bad_k(rng):
    with pytest.raises(ValueError, match="clusters"):
        rptq.cluster_channels(rng.normal(size=(1, 4, 2)), 5)
    with pytest.raises(ValueError, match="groups, channels, d"):
        rptq.cluster_channels(rng.normal(size=(4, 2)), 2)


def test_expand_perm_oracle(rng):
    groups, repeat, channels = 2, 3, 5
    perm = np.stack([rng.permutation(channels) for _ in range(groups)])
    x = rng.normal(size=groups * repeat * channels)
    want = x.reshape(groups, repeat, channels)
    want = np.stack([want[g][:, perm[g]] for g in range(groups)]).reshape(-1)
    np.testing.assert_array_equal(x[rptq.expand_perm(perm, x.size)], want)
    with pytest.raises(ValueError, match="not"):
        rptq.expand_perm(perm, 12)


# ------------------------------------------------------------------------------------------------- folding
# Falcon's three layouts: 7B (multi-query, one norm for parallel attention + MLP), 40B (grouped KV, ln_attn/ln_mlp),
# classic (per-head [q | k | v], sequential block).
FALCON_LAYOUTS = {"falcon": {}, "falcon-40b": dict(new_decoder_architecture=True, num_kv_heads=2),
                  "falcon-classic": dict(multi_query=False, parallel_attn=False)}


def _model(tiny_hf, family):
    return tiny_hf("falcon", **FALCON_LAYOUTS[family]).loaded if family in FALCON_LAYOUTS else tiny_hf(family).loaded


@pytest.mark.parametrize("family", ["llama", "opt", *FALCON_LAYOUTS])
def test_folded_random_permutations_keep_logits(tiny_hf, rng, rel_err, family):
    lm = _model(tiny_hf, family)
    points = rptq.reorder_points(lm.config)
    plans = [_random_plan(points, rng) for _ in range(lm.config.num_layers)]
    folded, norm_perms = rptq.fold_model(lm.params, lm.config, plans)
    ids = jnp.asarray(rng.integers(0, lm.config.vocab_size, (2, 16)))
    ref = _logits(lm.module, lm.params, ids)
    assert rel_err(_logits(lm.module, folded, ids, norm_perms), ref) < 1e-5
    # the folding did change the weights: without the norms' reordering the logits are wrong
    assert rel_err(_logits(lm.module, folded, ids), ref) > 1e-2
    if family == "opt":  # R2 folded into q/k (no RoPE): the q_proj columns moved
        assert not np.allclose(folded["layers_0"]["self_attn"]["q_proj"]["kernel"],
                               lm.params["layers_0"]["self_attn"]["q_proj"]["kernel"])
    elif family == "llama":  # RoPE: q/k untouched except their input rows (R1)
        np.testing.assert_array_equal(
            folded["layers_0"]["self_attn"]["q_proj"]["kernel"],
            lm.params["layers_0"]["self_attn"]["q_proj"]["kernel"][plans[0]["R1"].perm[0]])


@pytest.mark.parametrize("family", ["llama", "opt", "falcon"])
def test_calibrated_reorder_keeps_logits(tiny_hf, rng, rel_err, family):
    lm = _model(tiny_hf, family)
    calib = rng.integers(0, lm.config.vocab_size, (4, 16)).astype(np.int32)
    stats = rptq.model_stats(lm, calib, batch_size=2)
    points = rptq.reorder_points(lm.config)
    plans = [rptq.plan_layer(points, s, CLUSTERS) for s in stats]
    for name, cl in plans[0].items():
        assert cl.counts.sum(1).tolist() == [cl.labels.shape[1]] * cl.labels.shape[0], name
        assert np.any(cl.perm != np.arange(cl.perm.shape[1])), f"{name}: identity permutation"
    folded, norm_perms = rptq.fold_model(lm.params, lm.config, plans)
    ids = jnp.asarray(calib)
    assert rel_err(_logits(lm.module, folded, ids, norm_perms), _logits(lm.module, lm.params, ids)) < 1e-5


def test_rope_q_k_fold_refused(tiny_hf, rng):
    lm = tiny_hf("llama").loaded
    points = rptq.reorder_points(lm.config)
    with pytest.raises(ValueError, match="RoPE"):
        rptq.fold_layer(lm.params["layers_0"], points, _random_plan(points, rng), skip_unfoldable=False)


def test_unsupported_family_named():
    class Cfg:
        family = "gpt2"

    with pytest.raises(NotImplementedError, match="gpt2"):
        rptq.reorder_points(Cfg())


# ------------------------------------------------------------------------------------- activation quantizers
def _oracle_quant(x, ch_max, ch_min, ids, bits):
    """float64 numpy: the reference's per-cluster asymmetric min/max calibration and fake quantization; also returns
    the float64 x / scale (to spot rounding ties)."""
    x, ch_max, ch_min = (np.asarray(a, np.float64) for a in (x, ch_max, ch_min))
    n = ids.max() + 1
    cmax = np.array([ch_max[ids == c].max() for c in range(n)])
    cmin = np.array([ch_min[ids == c].min() for c in range(n)])
    scale = np.clip((cmax - cmin) / 2 ** bits, 1e-4, 1e4)
    zero = np.round(np.clip(-(cmax + cmin) / (2 * scale), -1e4, 1e4))
    s, z = scale[ids], zero[ids]
    ratio = x / s
    q = np.clip(np.round(ratio) + z, -2 ** (bits - 1), 2 ** (bits - 1) - 1)
    return (q - z) * s, scale, zero, ratio


def _random_clusters(rng, groups, channels, k):
    labels = np.stack([rng.permutation(np.arange(channels) % k) for _ in range(groups)]).astype(np.int32)
    perm = np.argsort(labels, axis=1, kind="stable").astype(np.int32)
    return rptq.ChannelClusters(labels, perm, np.stack([np.bincount(r, minlength=k) for r in labels]))


@pytest.mark.parametrize("bits", [8, 4, 3])
def test_fake_quant_matches_numpy_oracle(rng, bits):
    groups, repeat, channels, k = 2, 2, 12, 3
    width = groups * repeat * channels
    x = rng.normal(size=(3, 5, width)).astype(np.float32) * rng.uniform(0.1, 5, width).astype(np.float32)
    # calibration range from other tokens, so some of x falls outside it (clipped)
    calib = rng.normal(size=(40, width)).astype(np.float32) * rng.uniform(0.1, 5, width).astype(np.float32)
    ch_max, ch_min = calib.max(0), calib.min(0)
    ids = rptq.channel_cluster_ids(_random_clusters(rng, groups, channels, k), width)
    assert ids.max() == groups * repeat * k - 1
    qz = rptq.make_act_quantizer(ch_max, ch_min, ids, bits)
    got = np.asarray(rptq.fake_quant(jnp.asarray(x), qz, bits=bits))
    want, scale, zero, ratio = _oracle_quant(x, ch_max, ch_min, ids, bits)
    np.testing.assert_allclose(np.asarray(qz.scale), scale, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(qz.zero), zero)
    away_from_ties = np.abs(np.abs(ratio - np.floor(ratio)) - 0.5) > 1e-4
    assert away_from_ties.mean() > 0.99
    np.testing.assert_allclose(got[away_from_ties], want[away_from_ties], rtol=1e-5, atol=1e-6 * np.abs(want).max())
    assert np.abs(got - want).max() <= scale.max() * 1.0001  # at a tie: one step at most
    assert len(np.unique(got[..., ids == 0])) <= 2 ** bits  # one cluster: at most 2**bits levels
    clipped = (x > ch_max) | (x < ch_min)
    assert clipped.any()


def test_fake_quant_same_in_folded_order(rng):
    # Per-cluster quantization does not depend on the channel layout: quantizing the folded (permuted) activation
    # with the folded cluster ids gives the permuted result of quantizing the original one.
    groups, channels, k, bits = 2, 16, 4, 4
    cl = _random_clusters(rng, groups, channels, k)
    width = groups * channels
    x = rng.normal(size=(4, width)).astype(np.float32) * 3
    ch_max, ch_min = x.max(0) * 0.8, x.min(0) * 0.8
    perm = rptq.expand_perm(cl.perm, width)
    plain = rptq.make_act_quantizer(ch_max, ch_min, rptq.channel_cluster_ids(cl, width), bits)
    folded = rptq.make_act_quantizer(ch_max[perm], ch_min[perm], rptq.channel_cluster_ids(cl, width, True), bits)
    assert np.all(np.diff(np.asarray(folded.cluster_ids)) >= 0)  # contiguous clusters after the fold
    np.testing.assert_array_equal(np.asarray(rptq.fake_quant(jnp.asarray(x[:, perm]), folded, bits=bits)),
                                  np.asarray(rptq.fake_quant(jnp.asarray(x), plain, bits=bits))[:, perm])


def test_per_tensor_ablation_and_errors(rng):
    width = 24
    x = (rng.normal(size=(6, width)) * rng.uniform(0.1, 10, width)).astype(np.float32)
    one = rptq.make_act_quantizer(x.max(0), x.min(0), np.zeros(width, np.int32), 4)
    assert one.scale.shape == (1,)
    want, *_ = _oracle_quant(x, x.max(0), x.min(0), np.zeros(width, np.int64), 4)
    np.testing.assert_allclose(np.asarray(rptq.fake_quant(jnp.asarray(x), one, bits=4)), want, rtol=1e-5,
                               atol=1e-5 * np.abs(want).max())
    assert np.array_equal(np.asarray(rptq.fake_quant(jnp.asarray(x), one, bits=16)), x)
    with pytest.raises(ValueError, match="bits"):
        rptq.make_act_quantizer(x.max(0), x.min(0), np.zeros(width, np.int32), 1)
    with pytest.raises(ValueError, match="at least one channel"):
        rptq.make_act_quantizer(x.max(0), x.min(0), np.full(width, 2, np.int32), 4)
    with pytest.raises(ValueError, match="channels"):
        rptq.make_act_quantizer(x.max(0), x.min(0), np.zeros(width - 1, np.int32), 4)


def test_configurations_quantize_what_the_reference_does():
    a4 = rptq.activation_bits(4)
    assert a4 == {"norm_out": 8, "q": 4, "k": 4, "v": 4, "probs": 8, "o_in": 4, "fc2_in": 4}
    assert rptq.activation_bits(8) == dict.fromkeys(rptq.ACTIVATIONS, 8)
    kv3 = rptq.activation_bits(3, kv_only=True)
    assert {a for a, b in kv3.items() if b < 16} == {"k", "v"} and kv3["k"] == 3
    assert set(rptq.activation_bits(16).values()) == {16}
    for name, (wbits, abits, kv_only) in rptq.CONFIGURATIONS.items():
        assert name == f"W{wbits}A{abits}" + ("KV" if kv_only else "")


def test_fake_quant_probs(rng):
    p = jax.nn.softmax(jnp.asarray(rng.normal(size=(3, 17)) * 3), axis=-1)
    got = np.asarray(rptq.fake_quant_probs(p, 8))
    scaled = np.asarray(p, np.float64) * 255
    away_from_ties = np.abs(np.abs(scaled - np.floor(scaled)) - 0.5) > 1e-4  # float32 may round either way there
    np.testing.assert_allclose(got[away_from_ties], np.round(scaled[away_from_ties]) / 255, atol=1e-7)
    assert not np.allclose(got, np.asarray(p))
    assert rptq.fake_quant_probs(p, 16) is p


@pytest.mark.parametrize("folded", [False, True])
def test_linear_inputs_quantized_in_forward(tiny_hf, rng, folded):
    lm = tiny_hf("llama").loaded
    c = lm.config
    layer = lm.family.DecoderLayer(c, lm.dtype)
    points = rptq.reorder_points(c)
    positions = jnp.broadcast_to(jnp.arange(12), (2, 12))
    inputs = [jnp.asarray(lm.params["embed_tokens"]["embedding"])[b] for b in rng.integers(0, 128, (2, 2, 12))]
    lp = lm.params["layers_0"]
    stats = rptq.layer_stats(layer, lp, inputs, positions, rptq.all_taps(points), ema=0.99)
    plan = rptq.plan_layer(points, stats, CLUSTERS)
    quantizers = rptq.linear_input_quantizers(points, stats, plan, abits=4, folded=folded)
    assert set(quantizers) == {"self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/o_proj",
                               "mlp/up_proj", "mlp/gate_proj", "mlp/down_proj"}
    assert quantizers["self_attn/q_proj"][1] == 8 and quantizers["self_attn/o_proj"][1] == 4  # norm out at 8 bits
    norm_perms = {}
    if folded:
        lp, norm_perms = rptq.fold_layer(lp, points, plan)

    def sown(with_quant):
        def run(p, h):
            return layer.apply({"params": p}, h, positions, mutable=["intermediates"])[1]["intermediates"]
        with rptq.reordered_norms(norm_perms), (rptq.quantized_linear_inputs(quantizers) if with_quant
                                                 else contextlib.nullcontext()):
            return jax.jit(run)(lp, inputs[0])

    plain, quant = sown(False), sown(True)
    for name, (qz, bits) in quantizers.items():
        node = quant
        for key in name.split("/"):
            node = node[key]
        x = np.asarray(node["inputs"][0], np.float64)
        s, z = np.asarray(qz.scale)[np.asarray(qz.cluster_ids)], np.asarray(qz.zero)[np.asarray(qz.cluster_ids)]
        codes = x / s + z  # every quantized input lies on its cluster's grid
        np.testing.assert_allclose(codes, np.round(codes), atol=1e-3, err_msg=name)
        assert codes.min() >= -2 ** (bits - 1) - 1e-3 and codes.max() <= 2 ** (bits - 1) - 1 + 1e-3
    # q_proj's input is the first quantized activation: the oracle quantization of the float norm output
    ids = np.asarray(quantizers["self_attn/q_proj"][0].cluster_ids)
    mx, mn = (np.asarray(a) for a in stats[("in", "self_attn/q_proj")])
    if folded:
        perm = rptq.expand_perm(plan["R1"].perm, mx.size)
        mx, mn = mx[perm], mn[perm]
    want, _, _, ratio = _oracle_quant(plain["self_attn"]["q_proj"]["inputs"][0], mx, mn, ids, 8)
    got = np.asarray(quant["self_attn"]["q_proj"]["inputs"][0])
    away_from_ties = np.abs(np.abs(ratio - np.floor(ratio)) - 0.5) > 1e-4
    np.testing.assert_allclose(got[away_from_ties], want[away_from_ties], rtol=1e-5, atol=1e-6 * np.abs(want).max())


# --------------------------------------------------------------------------- q / k / v / probabilities (model hook)
@contextlib.contextmanager
def _recording(seen):
    """Records (name, input, output) of every ``attention_activation`` call; entered before (outside) the quantizing
    interceptor, so the output is what the attention goes on with."""
    import flax.linen as nn

    def interceptor(next_fun, args, kwargs, context):
        y = next_fun(*args, **kwargs)
        if context.method_name == "attention_activation":
            seen.append(("/".join(context.module.path), args[0], np.asarray(args[1]), np.asarray(y)))
        return y

    with nn.intercept_methods(interceptor):
        yield


@pytest.mark.parametrize("family,kv_only", [("llama", False), ("llama", True), ("opt", False), ("falcon", False)])
def test_attention_activations_on_their_grids(tiny_hf, rng, family, kv_only):
    lm = tiny_hf(family).loaded
    c = lm.config
    heads = {"q": c.num_heads, "k": c.num_kv_heads, "v": c.num_kv_heads} if family != "opt" else \
        {"q": c.num_heads, "k": c.num_heads, "v": c.num_heads}
    bits = 3
    attn = {"llama": "self_attn", "opt": "self_attn", "falcon": "self_attention"}[family]
    quantizers, oracle = {}, {}
    for layer in range(c.num_layers):
        acts = {}
        for name, h in heads.items():
            if kv_only and name == "q":
                continue
            width = h * c.head_dim
            # random per-channel ranges around the activations' scale, random clusters of channels
            ch_max = rng.uniform(0.2, 2.0, width)
            ch_min = -rng.uniform(0.2, 2.0, width)
            ids = rng.integers(0, 5, width)
            ids[:5] = np.arange(5)
            acts[name] = (rptq.make_act_quantizer(ch_max, ch_min, ids, bits), bits)
            oracle[(f"layers_{layer}/{attn}", name)] = (ch_max, ch_min, ids)
        if not kv_only:
            acts["probs"] = (None, 8)
        quantizers[f"layers_{layer}/{attn}"] = acts
    ids = rng.integers(0, c.vocab_size, (2, 9))
    kv_heads = heads["k"]
    cache = init_cache(c.num_layers, 2, 12, kv_heads, c.head_dim, jnp.float32)
    seen = []
    # eagerly (the recorder keeps concrete values), through the KV cache: what is stored is the quantized k / v
    fn = lambda p, x, cache: lm.module.apply({"params": p}, x, cache=cache, cache_index=0)  # noqa: E731
    with _recording(seen), rptq.quantized_attention(quantizers):
        _, new_cache = fn(lm.params, jnp.asarray(ids), cache)
    assert len(seen) == 4 * c.num_layers
    for path, name, x, y in seen:
        if (path, name) in oracle:
            ch_max, ch_min, cl = oracle[(path, name)]
            flat = x.reshape(*x.shape[:-2], -1)
            want, _, _, ratio = _oracle_quant(flat, ch_max, ch_min, cl, bits)
            away_from_ties = np.abs(np.abs(ratio - np.floor(ratio)) - 0.5) > 1e-4
            np.testing.assert_allclose(y.reshape(flat.shape)[away_from_ties], want[away_from_ties], rtol=1e-5,
                                       atol=1e-6, err_msg=f"{path} {name}")
            assert not np.array_equal(x, y), f"{path} {name} was not quantized"
            if name in ("k", "v"):
                layer = int(path.split("/")[0].split("_")[1])
                np.testing.assert_array_equal(np.asarray(new_cache[layer][name][:, :9]), y)
        elif name == "probs" and not kv_only:
            scaled = x.astype(np.float64) * 255
            away_from_ties = np.abs(np.abs(scaled - np.floor(scaled)) - 0.5) > 1e-4  # float32 may round either way
            np.testing.assert_allclose(y[away_from_ties], np.round(scaled[away_from_ties]) / 255, atol=1e-7)
            assert not np.array_equal(x, y)
        else:  # KV-only: q and the probabilities pass exactly
            np.testing.assert_array_equal(y, x, err_msg=f"{path} {name}")


# ---------------------------------------------------------------------------------------- the whole model
@pytest.fixture(scope="module")
def rptq_run(tiny_hf):
    """``rptq_run(name, reorder=True) -> (lm, calib, params, state, report)``: one ``quantize_model_rptq`` run of
    the tiny LLaMA per configuration (per-channel GPTQ), on one set of random calibration windows for the module."""
    from conftest import new_seed
    from jaxquant.config import QuantConfig

    calib = np.random.default_rng(new_seed()).integers(0, 128, (4, 16)).astype(np.int32)
    cache = {}

    def get(name, reorder=True):
        if (name, reorder) not in cache:
            lm = tiny_hf("llama").loaded
            weight = QuantConfig(bits=rptq.CONFIGURATIONS[name][0], group_size=-1)
            cfg = rptq.RPTQConfig.named(name, weight, clusters=tuple(CLUSTERS.items()), reorder=reorder)
            cache[(name, reorder)] = (lm, calib, *rptq.quantize_model_rptq(lm, calib, cfg))
        return cache[(name, reorder)]

    return get


def _dense(leaf):
    return np.asarray(leaf.dequantize() if hasattr(leaf, "dequantize") else leaf)


def _np_fake_quant(x, quantizer, bits):
    """float32 numpy (as XLA rounds: x / s in float32, half to even) of the reference's fake quantization."""
    s = np.asarray(quantizer.scale)[np.asarray(quantizer.cluster_ids)]
    z = np.asarray(quantizer.zero)[np.asarray(quantizer.cluster_ids)]
    q = np.clip(np.round(x.astype(np.float32) / s) + z, -2 ** (bits - 1), 2 ** (bits - 1) - 1)
    return ((q - z) * s).astype(np.float32)


def test_rptq_w4a16_equals_gptq_on_folded_weights(rptq_run, rng):
    from jaxquant import pipeline
    from jaxquant.config import QuantConfig

    lm, calib, params, state, _ = rptq_run("W4A16")
    weight = QuantConfig(bits=4, group_size=-1)
    assert all(lq == {"linear": {}, "attention": {}} for lq in state.layers)
    points = rptq.reorder_points(lm.config)
    folded = dict(lm.params)
    for i, plan in enumerate(state.plans):
        assert set(plan) == {"R1", "R2", "R3", "R4", "R5"}
        folded[f"layers_{i}"], _ = rptq.fold_layer(lm.params[f"layers_{i}"], points, plan, perm_in_params=True)
        perm = np.asarray(params[f"layers_{i}"]["input_layernorm"]["input_perm"])
        assert not np.array_equal(perm, np.arange(perm.size)), "R1 was not reordered"
    ref, _ = pipeline.quantize_model(lm, calib, weight, "gptq", params=folded, progress=False)
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: hasattr(x, "dequantize"))[0]
    flat_ref = jax.tree_util.tree_flatten_with_path(ref, is_leaf=lambda x: hasattr(x, "dequantize"))[0]
    assert [p for p, _ in flat] == [p for p, _ in flat_ref]
    assert sum(hasattr(leaf, "dequantize") for _, leaf in flat) == 7 * lm.config.num_layers
    for (path, a), (_, b) in zip(flat, flat_ref):
        np.testing.assert_array_equal(_dense(a), _dense(b), err_msg=jax.tree_util.keystr(path))
    ids = jnp.asarray(rng.integers(0, 128, (2, 10)))
    module, p = rptq.act_quantized(lm.module, params, state)
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda p, x: module.apply({"params": p}, x)[0])(p, ids)),
                                  np.asarray(jax.jit(lambda p, x: lm.module.apply({"params": p}, x)[0])(ref, ids)))


def test_rptq_kv_only_quantizes_only_k_and_v(rptq_run, rng):
    import flax.linen as nn

    params16 = rptq_run("W4A16")[2]
    lm, _, params, state, _ = rptq_run("W4A4KV")
    assert state.attention_bits() == {"k": 4, "v": 4} and state.linear_bits == {}
    for lq in state.layers:
        assert lq["linear"] == {} and set(lq["attention"]) == {"k", "v"}
    # layer 0 sees the same inputs in both runs: same clusters, same weights; later layers see the quantized cache
    for leaf_a, leaf_b in zip(jax.tree.leaves(params["layers_0"]), jax.tree.leaves(params16["layers_0"])):
        np.testing.assert_array_equal(np.asarray(leaf_a), np.asarray(leaf_b))

    ids = jnp.asarray(rng.integers(0, 128, (2, 10)))
    module, p = rptq.act_quantized(lm.module, params, state)
    got = np.asarray(jax.jit(lambda p, x: module.apply({"params": p}, x)[0])(p, ids))

    def kv_oracle(next_fun, args, kwargs, context):  # numpy k / v quantization, everything else untouched
        if context.method_name == "attention_activation" and args[0] in ("k", "v"):
            layer = int(context.module.path[0].split("_")[1])
            x = np.asarray(args[1])
            flat = x.reshape(*x.shape[:2], -1)
            y = _np_fake_quant(flat, state.layers[layer]["attention"][args[0]], 4).reshape(x.shape)
            return next_fun(args[0], jnp.asarray(y))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(kv_oracle):
        want = np.asarray(lm.module.apply({"params": params}, ids)[0])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    plain = np.asarray(lm.module.apply({"params": params}, ids)[0])
    assert np.abs(plain - got).max() > 1e-3 * np.abs(plain).max(), "k / v quantization changed nothing"


@pytest.mark.parametrize("name,reorder", [("W4A4", True), ("W4A8", False), ("W4A4KV", True)])
def test_rptq_configurations_end_to_end(rptq_run, rng, name, reorder):
    from jaxquant.eval import perplexity

    lm, _, params, state, report = rptq_run(name, reorder)
    c = lm.config
    assert len(report.layers) == 7 * c.num_layers
    for i, lq in enumerate(state.layers):
        if name.endswith("KV"):
            assert lq["linear"] == {} and set(lq["attention"]) == {"k", "v"}
        else:
            assert set(lq["linear"]) == {"self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/o_proj",
                                         "mlp/up_proj", "mlp/gate_proj", "mlp/down_proj"}
            assert set(lq["attention"]) == {"q", "k", "v"}
        for quantizer in list(lq["linear"].values()) + list(lq["attention"].values()):
            clusters = np.asarray(quantizer.scale).size
            assert clusters > 1 if reorder else clusters == 1
        assert ("input_perm" in params[f"layers_{i}"]["input_layernorm"]) == reorder
    text = rng.integers(0, 128, 4 * 16)
    quantized = perplexity(*rptq.act_quantized(lm.module, params, state), text, seqlen=16, batch_size=2,
                           progress=False)["ppl"]
    weights_only = perplexity(lm.module, params, text, seqlen=16, batch_size=2, progress=False)["ppl"]
    assert np.isfinite(quantized) and quantized != weights_only


@pytest.mark.parametrize("name,reorder", [("W4A4", True), ("W4A16", True), ("W4A8", False)])
def test_rptq_checkpoint_round_trip(rptq_run, rng, tmp_path, name, reorder):
    from jaxquant import checkpoint

    lm, _, params, state, report = rptq_run(name, reorder)
    cfg = rptq.RPTQConfig.named(name, clusters=tuple(CLUSTERS.items()), reorder=reorder)
    rptq.save_rptq(str(tmp_path / "q"), params, state, lm, cfg, report)
    loaded = checkpoint.load(str(tmp_path / "q"))
    assert loaded.quant_meta["method"] == "rptq"
    assert loaded.rptq_state.bits == state.bits and loaded.rptq_state.linear_bits == state.linear_bits
    for got, want in zip(loaded.rptq_state.layers, state.layers):
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ids = jnp.asarray(rng.integers(0, 128, (2, 10)))
    module, p = rptq.act_quantized(lm.module, params, state)
    want = np.asarray(jax.jit(lambda p, x: module.apply({"params": p}, x)[0])(p, ids))
    got = np.asarray(jax.jit(lambda p, x: loaded.module.apply({"params": p}, x)[0])(loaded.params, ids))
    np.testing.assert_array_equal(got, want)


def test_cli_quantize_rptq_and_eval(tiny_hf, smollm2_tokenizer, tmp_path, capsys, rng):
    """``jaxquant quantize --method rptq --wbits 4 --abits 4 --kv-only`` writes a checkpoint that loads back as the
    model ``quantize_model_rptq`` gives on the same calibration, and ``jaxquant eval`` runs it."""
    import json
    import shutil

    from jaxquant import checkpoint, data
    from jaxquant.cli import main
    from jaxquant.config import QuantConfig

    tok = smollm2_tokenizer
    b = tiny_hf("llama", vocab_size=len(tok))
    model_dir = tmp_path / "model"
    shutil.copytree(b.dir, model_dir)
    tok.save_pretrained(str(model_dir))
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "seven", "north", "light"]
    text = tmp_path / "text.txt"
    text.write_text(" ".join(rng.choice(words, 600)))
    out = tmp_path / "q"
    capsys.readouterr()
    assert main(["quantize", "--model", str(model_dir), "--method", "rptq", "--wbits", "4", "--abits", "4",
                 "--kv-only", "--nsamples", "2", "--seqlen", "16", "--calib", str(text), "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["method"] == "rptq" and summary["bits"] == 4 and summary["abits"] == 4 and summary["kv_only"]
    loaded = checkpoint.load(str(out))
    assert loaded.rptq_state.attention_bits() == {"k": 4, "v": 4}

    lm = b.loaded
    calib = data.calibration_windows(tok, n=2, seqlen=16, seed=0, source=str(text))
    params, state, _ = rptq.quantize_model_rptq(
        lm, calib, rptq.RPTQConfig(QuantConfig(bits=4, group_size=-1), abits=4, kv_only=True), batch_size=2)
    ids = jnp.asarray(rng.integers(0, len(tok), (1, 12)))
    module, p = rptq.act_quantized(lm.module, params, state)
    np.testing.assert_array_equal(np.asarray(loaded.module.apply({"params": loaded.params}, ids)[0]),
                                  np.asarray(module.apply({"params": p}, ids)[0]))
    with pytest.raises(SystemExit, match="rptq only"):
        main(["quantize", "--model", str(model_dir), "--method", "gptq", "--abits", "4", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="RPTQ"):
        main(["quantize", "--model", str(model_dir), "--method", "rptq", "--abits", "1", "--out", str(tmp_path / "x")])
    capsys.readouterr()
    assert main(["eval", "--model", str(out), "--dataset", str(text), "--seqlen", "16", "--max-windows", "2"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["method"] == "rptq" and np.isfinite(row["ppl"])


def test_rptq_generation_through_quantized_cache(rptq_run, rng):
    """Greedy generation with the quantized KV cache (k / v quantized per channel as they are written) picks, at
    every step, the argmax of the full forward over the sequence so far."""
    from models.generate import generate

    lm, _, params, state, _ = rptq_run("W4A4KV")
    module, p = rptq.act_quantized(lm.module, params, state)
    prompt = [int(t) for t in rng.integers(0, 128, 6)]
    out = generate(module, p, [prompt], max_new_tokens=4)
    assert len(out[0]) == 4
    seq = prompt + [int(t) for t in out[0]]
    logits = np.asarray(module.apply({"params": p}, jnp.asarray([seq]))[0])[0]
    for i in range(len(prompt), len(seq)):
        assert seq[i] == int(np.argmax(logits[i - 1])), f"step {i - len(prompt)}"
