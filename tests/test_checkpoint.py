"""Quantized checkpoints: the orbax format (bit-identical round trip, metadata, refusal to overwrite, tampered files)
and the GPTQ safetensors export (v1 / v2 zero points, 3 / 4 bits, act-order, read back exactly and by an independent
numpy reader into the transformers model; broken exports rejected with the tensor named)."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax.traverse_util import flatten_dict, unflatten_dict  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from conftest import jit_logits  # noqa: E402
from jaxquant import checkpoint, gptq_export  # noqa: E402
from jaxquant.formats import UniformQuantizedWeight, quantized_bits  # noqa: E402
from jaxquant.packing import pack_qzeros  # noqa: E402
from models.weights import CheckpointError  # noqa: E402

RUNS = {"rtn": dict(bits=4, group_size=32), "gptq": dict(bits=4, group_size=32, act_order=True)}
RTN3 = dict(bits=3, group_size=32)


def _flat(params):
    return flatten_dict(params, is_leaf=lambda _, v: isinstance(v, UniformQuantizedWeight))


def _is_q(v):
    return isinstance(v, UniformQuantizedWeight)


def _assert_trees_identical(a, b):
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for path, x in fa.items():
        y, what = fb[path], "/".join(path)
        assert _is_q(x) == _is_q(y), what
        if _is_q(x):
            for f in dataclasses.fields(x):
                u, v = getattr(x, f.name), getattr(y, f.name)
                if f.name in ("qweight", "qzeros", "scales", "g_idx"):
                    assert np.asarray(u).dtype == np.asarray(v).dtype, (what, f.name)
                    np.testing.assert_array_equal(np.asarray(u), np.asarray(v), err_msg=f"{what}.{f.name}")
                else:
                    assert u == v, (what, f.name)
        else:
            assert np.asarray(x).dtype == np.asarray(y).dtype, what
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=what)


def _ids(rng, vocab=128, shape=(2, 12)):
    return rng.integers(0, vocab, shape).astype(np.int32)


# --------------------------------------------------------------------------------------------------------- orbax
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_orbax_round_trip_is_bit_identical(tiny_quantized, tmp_path, rng, method):
    q = tiny_quantized(method, **RUNS[method])
    path = tmp_path / "ckpt"
    path.mkdir()  # an existing empty directory is fine
    calib = {"source": "random ids", "nsamples": 4, "seqlen": 32, "seed": 0}
    checkpoint.save(str(path), q.params, q.lm, method, q.config, q.report, extra={"calib": calib, "quant_wall_s": 1.5})
    assert checkpoint.is_checkpoint(str(path)) and not os.path.exists(str(path) + ".partial")
    loaded = checkpoint.load(str(path))

    assert loaded.config == q.lm.config and loaded.hf_config == q.lm.hf_config and loaded.dtype == q.lm.dtype
    assert loaded.family is q.lm.family and loaded.tokenizer is None
    _assert_trees_identical(loaded.params, q.params)
    ids = _ids(rng)
    np.testing.assert_array_equal(jit_logits(loaded.module, loaded.params, ids), jit_logits(q.lm.module, q.params, ids))

    meta = loaded.quant_meta
    assert meta["method"] == method and meta["calib"] == calib and meta["quant_wall_s"] == 1.5
    assert meta["quant_config"] == dataclasses.asdict(q.config)
    assert meta["avg_bits"] == quantized_bits(q.params)["avg_bits"]
    raw = json.loads((path / checkpoint.METADATA_FILE).read_text())
    assert raw["report"]["total_error"] == q.report.total_error() and raw["report"]["layers"] == q.report.layers
    assert raw["dtype"] == "float32" and raw["model_type"] == "llama"
    leaf = q.params["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert raw["quantized"]["layers_0/self_attn/q_proj/kernel"] == {
        "format": "UniformQuantizedWeight", "bits": 4, "group_size": 32, "sym": False,
        "in_features": leaf.in_features, "out_features": leaf.out_features}


def _snapshot(directory):
    return {os.path.relpath(os.path.join(root, f), directory): open(os.path.join(root, f), "rb").read()
            for root, _, files in os.walk(directory) for f in files}


def test_save_refuses_non_empty_directory(tiny_quantized, tmp_path):
    q = tiny_quantized("rtn", **RUNS["rtn"])
    path = tmp_path / "taken"
    (path / "sub").mkdir(parents=True)
    (path / "notes.txt").write_text("precious")
    (path / "sub" / "data.bin").write_bytes(b"\x00\x01")
    before = _snapshot(path)
    with pytest.raises(FileExistsError, match="not empty"):
        checkpoint.save(str(path), q.params, q.lm, "rtn", q.config)
    assert _snapshot(path) == before
    assert sorted(os.listdir(tmp_path)) == ["taken"]  # no partial directory left behind


@pytest.fixture(scope="module")
def saved_rtn(tiny_quantized, tmp_path_factory):
    q = tiny_quantized("rtn", **RUNS["rtn"])
    path = tmp_path_factory.mktemp("orbax") / "ckpt"
    checkpoint.save(str(path), q.params, q.lm, "rtn", q.config, q.report)
    return q, path


def _tampered_copy(saved, tmp_path, edit_plain=None, edit_meta=None):
    import orbax.checkpoint as ocp

    q, src = saved
    path = tmp_path / "tampered"
    shutil.copytree(src, path)
    if edit_plain is not None:
        plain, _ = checkpoint._split(q.params)
        edit_plain(plain)
        shutil.rmtree(path / "params")
        ckpt = ocp.StandardCheckpointer()
        ckpt.save(str(path / "params"), plain)
        ckpt.wait_until_finished()
    if edit_meta is not None:
        meta = json.loads((path / checkpoint.METADATA_FILE).read_text())
        edit_meta(meta)
        (path / checkpoint.METADATA_FILE).write_text(json.dumps(meta))
    return str(path)


@pytest.mark.parametrize("case,message", [
    ("drop scales", "missing tensor layers_0/self_attn/q_proj/kernel/scales"),
    ("drop norm", "missing tensor layers_1/post_attention_layernorm/scale"),
    ("bits 4 -> 3 in metadata", "quantized layers_1/mlp/down_proj/kernel: qweight has shape"),
    ("group_size 32 -> 64 in metadata", "quantized layers_0/self_attn/k_proj/kernel: qzeros has shape"),
    ("unknown format in metadata", "layers_0/mlp/up_proj/kernel has unknown quantized format 'NF4Weight'"),
    ("metadata entry removed", "missing tensor layers_0/self_attn/o_proj/kernel"),
    ("unknown field in metadata", "metadata of quantized layers_0/self_attn/v_proj/kernel does not fit"),
])
def test_tampered_checkpoint_names_the_tensor(saved_rtn, tmp_path, case, message):
    edits = {
        "drop scales": dict(edit_plain=lambda p: p["layers_0"]["self_attn"]["q_proj"]["kernel"].pop("scales")),
        "drop norm": dict(edit_plain=lambda p: p["layers_1"].pop("post_attention_layernorm")),
        "bits 4 -> 3 in metadata": dict(
            edit_meta=lambda m: m["quantized"]["layers_1/mlp/down_proj/kernel"].update(bits=3)),
        "group_size 32 -> 64 in metadata": dict(
            edit_meta=lambda m: m["quantized"]["layers_0/self_attn/k_proj/kernel"].update(group_size=64)),
        "unknown format in metadata": dict(
            edit_meta=lambda m: m["quantized"]["layers_0/mlp/up_proj/kernel"].update(format="NF4Weight")),
        "metadata entry removed": dict(edit_meta=lambda m: m["quantized"].pop("layers_0/self_attn/o_proj/kernel")),
        "unknown field in metadata": dict(
            edit_meta=lambda m: m["quantized"]["layers_0/self_attn/v_proj/kernel"].update(codebook=3)),
    }
    path = _tampered_copy(saved_rtn, tmp_path, **edits[case])
    with pytest.raises(CheckpointError) as err:
        checkpoint.load(path)
    assert message in str(err.value)


# ------------------------------------------------------------------------------------------------- GPTQ export
def _np_unpack(words, bits, axis):
    """Independent reader: codes packed into int32 words along ``axis`` as one little-endian bit stream (code c in
    stream bits [c*bits, (c+1)*bits), word w holding bits [32w, 32w+32)): AutoGPTQ's layout for 2/3/4/8 bits."""
    w = np.ascontiguousarray(np.moveaxis(np.asarray(words), axis, -1), "<i4").view(np.uint8)  # bytes, low first
    stream = np.unpackbits(w, axis=-1, bitorder="little")  # [..., 32 * words]
    codes = stream.reshape(*stream.shape[:-1], -1, bits) @ (1 << np.arange(bits))
    return np.moveaxis(codes.astype(np.int64), -1, axis)


def _with_g_idx_permuted(params, seed):
    """Act-order layout for any quantization: each kernel's g_idx is a random permutation of arange(K) // gs."""
    rng = np.random.default_rng(seed)
    flat = _flat(params)
    for path, leaf in flat.items():
        if _is_q(leaf):
            flat[path] = dataclasses.replace(leaf, g_idx=jnp.asarray(rng.permutation(np.asarray(leaf.g_idx))))
    return unflatten_dict(flat)


def _as_exported(params, dtype=np.float16):
    """What an export stores: scales in float16, every other tensor through ``dtype`` (read back as float32)."""
    flat = _flat(params)
    for path, leaf in flat.items():
        if _is_q(leaf):
            flat[path] = dataclasses.replace(leaf, scales=jnp.asarray(np.asarray(leaf.scales).astype(np.float16)))
        else:
            flat[path] = jnp.asarray(np.asarray(leaf).astype(dtype).astype(np.float32))
    return unflatten_dict(flat)


def _reference_state_dict(directory, fmt):
    """The exported tensors dequantized by AutoGPTQ's formula in numpy (independent of jaxquant):
    W[n, k] = scales[g_idx[k], n] * (code[k, n] - zero[g_idx[k], n]), zero = stored + 1 (v1, wrapping) or stored."""
    tensors = load_file(os.path.join(directory, "model.safetensors"))
    cfg = json.loads(open(os.path.join(directory, "config.json")).read())["quantization_config"]
    bits = cfg["bits"]
    out = {}
    for name, t in tensors.items():
        prefix, _, suffix = name.rpartition(".")
        if suffix in ("qzeros", "scales", "g_idx"):
            continue
        if suffix != "qweight":
            out[name] = torch.from_numpy(t.astype(np.float32))
            continue
        codes = _np_unpack(t, bits, axis=0)  # [K, N]
        zeros = _np_unpack(tensors[prefix + ".qzeros"], bits, axis=1)  # [G, N]
        if fmt == "gptq":
            zeros = (zeros + 1) % 2**bits
        g = tensors[prefix + ".g_idx"]
        scales = tensors[prefix + ".scales"].astype(np.float32)
        w = scales[g] * (codes - zeros[g]).astype(np.float32)  # [K, N]
        out[prefix + ".weight"] = torch.from_numpy(np.ascontiguousarray(w.T))
    return out


def _hf_logits(hf_model, state, ids):
    model = type(hf_model)(hf_model.config).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    if "lm_head.weight" in missing:
        assert hf_model.config.tie_word_embeddings
        model.tie_weights()
    with torch.no_grad():
        return model(torch.from_numpy(ids).long(), use_cache=False).logits.numpy()


EXPORT_CASES = {  # name: (run, bits, act-order)
    "4bit": ("rtn", 4, False),
    "4bit-act-order": ("gptq", 4, True),  # a real GPTQ act-order run: g_idx = (arange(K) // gs)[invperm]
    "3bit": ("rtn3", 3, False),
    "3bit-act-order": ("rtn3", 3, True),  # RTN codes with a permuted g_idx (the layout is what is tested)
}


@pytest.fixture(scope="module")
def exported(tiny_quantized, tmp_path_factory):
    cache = {}

    def get(case):
        if case not in cache:
            run, bits, act = EXPORT_CASES[case]
            q = tiny_quantized("rtn", **RTN3) if run == "rtn3" else tiny_quantized(run, **RUNS[run])
            params = q.params
            if act and run == "rtn3":
                params = _with_g_idx_permuted(params, seed=bits)
            cfg = dataclasses.replace(q.config, act_order=act)
            base = tmp_path_factory.mktemp(f"gptq_{case}")
            dirs = {fmt: gptq_export.export(str(base / fmt), params, q.lm, cfg, checkpoint_format=fmt)
                    for fmt in gptq_export.CHECKPOINT_FORMATS}
            cache[case] = (q, params, cfg, dirs)
        return cache[case]

    return get


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_gptq_export_round_trip(exported, tiny_hf, rng, case):
    q, params, cfg, dirs = exported(case)
    _, bits, act = EXPORT_CASES[case]
    want = _as_exported(params)
    ids = _ids(rng)
    want_logits = jit_logits(q.lm.module, want, ids)
    original = load_file(os.path.join(tiny_hf("llama").dir, "model.safetensors"))
    loaded = {}
    for fmt, directory in dirs.items():
        assert sorted(os.listdir(directory)) == ["config.json", "model.safetensors", "quantize_config.json"]
        config = json.loads(open(os.path.join(directory, "config.json")).read())
        qc = config.pop("quantization_config")
        assert config.pop("dtype") == "float16" and config.pop("torch_dtype", "float16") == "float16"
        assert config == {k: v for k, v in q.lm.hf_config.items() if k not in ("dtype", "torch_dtype")}
        expected_qc = {"quant_method": "gptq", "bits": bits, "group_size": 32, "desc_act": act, "sym": False,
                       "static_groups": False, "true_sequential": True, "damp_percent": 0.01,
                       "checkpoint_format": fmt}
        assert {k: qc[k] for k in expected_qc} == expected_qc
        qfile = json.loads(open(os.path.join(directory, "quantize_config.json")).read())
        assert {k: qfile[k] for k in expected_qc} == expected_qc

        # Tensor names: the HF checkpoint's own, with each decoder-layer linear weight replaced by the GPTQ four.
        tensors = load_file(os.path.join(directory, "model.safetensors"))
        names = set()
        for name in original:
            if name.startswith("model.layers.") and name.endswith("_proj.weight"):
                names |= {name[: -len("weight")] + s for s in ("qweight", "qzeros", "scales", "g_idx")}
            else:
                names.add(name)
        assert set(tensors) == names
        for name, t in tensors.items():
            kind = name.rpartition(".")[2]
            assert t.dtype == {"qweight": np.int32, "qzeros": np.int32, "g_idx": np.int32}.get(kind, np.float16), name
        K, N = original["model.layers.0.mlp.down_proj.weight"].shape[::-1]
        assert tensors["model.layers.0.mlp.down_proj.qweight"].shape == (K * bits // 32, N)
        assert tensors["model.layers.0.mlp.down_proj.qzeros"].shape == (K // 32, N * bits // 32)
        assert tensors["model.layers.0.mlp.down_proj.scales"].shape == (K // 32, N)

        lm = gptq_export.load(directory)
        assert lm.config == q.lm.config and lm.quant_meta["checkpoint_format"] == fmt
        _assert_trees_identical(lm.params, want)  # codes, zeros, g_idx, fp16 scales: bit-identical
        for path, leaf in _flat(lm.params).items():
            if _is_q(leaf):
                np.testing.assert_array_equal(np.asarray(leaf.dequantize()), np.asarray(_flat(want)[path].dequantize()))
                assert act == (not np.array_equal(np.asarray(leaf.g_idx), np.arange(leaf.in_features) // 32))
        np.testing.assert_array_equal(jit_logits(lm.module, lm.params, ids), want_logits)
        loaded[fmt] = lm
        # An independent numpy reader (AutoGPTQ's formula) put into the transformers model gives the same logits.
        hf = _hf_logits(tiny_hf("llama").hf, _reference_state_dict(directory, fmt), ids)
        assert np.max(np.abs(hf - want_logits)) <= 1e-4 * np.max(np.abs(hf))
    _assert_trees_identical(loaded["gptq"].params, loaded["gptq_v2"].params)


def test_v1_zeros_on_disk_are_zero_minus_one(exported):
    """Checked with plain numpy shifts on one 4-bit tensor: AutoGPTQ packs 8 zero codes per int32 along N, code j in
    bits [4j, 4j+4); v1 stores zero - 1, v2 the zero itself. qweight likewise along K."""
    q, params, _, dirs = exported("4bit")
    v1 = load_file(os.path.join(dirs["gptq"], "model.safetensors"))
    v2 = load_file(os.path.join(dirs["gptq_v2"], "model.safetensors"))
    leaf = params["layers_1"]["self_attn"]["k_proj"]["kernel"]
    zeros = np.asarray(leaf.zeros())  # [G, N], jaxquant's in-memory (plain) zero points

    def unpack_along_n(words):
        w = words.view(np.uint32)
        return np.stack([(w >> (4 * j)) & 0xF for j in range(8)], axis=-1).reshape(w.shape[0], -1).astype(np.int64)

    name = "model.layers.1.self_attn.k_proj"
    np.testing.assert_array_equal(unpack_along_n(v2[name + ".qzeros"]), zeros)
    np.testing.assert_array_equal(unpack_along_n(v1[name + ".qzeros"]), (zeros - 1) % 16)
    qw = v1[name + ".qweight"].view(np.uint32)
    codes = np.stack([(qw >> (4 * j)) & 0xF for j in range(8)], axis=1).reshape(-1, qw.shape[1])
    np.testing.assert_array_equal(codes, np.asarray(leaf.codes()))
    np.testing.assert_array_equal(v1[name + ".qweight"], v2[name + ".qweight"])


def _replace_zeros(params, make):
    flat = _flat(params)
    for path, leaf in flat.items():
        if _is_q(leaf):
            z = make(np.asarray(leaf.zeros()), path)
            flat[path] = dataclasses.replace(leaf, qzeros=pack_qzeros(jnp.asarray(z, jnp.int32), leaf.bits))
    return unflatten_dict(flat)


def test_v1_symmetric_and_wrapped_zero_points(tiny_quantized, tmp_path):
    q = tiny_quantized("rtn", **RUNS["rtn"])
    # Symmetric: zero = 8 everywhere -> v1 words 0x77777777, v2 words 0x88888888.
    sym = _replace_zeros(q.params, lambda z, _: np.full_like(z, 8))
    sym = unflatten_dict({p: dataclasses.replace(v, sym=True) if _is_q(v) else v for p, v in _flat(sym).items()})
    cfg = dataclasses.replace(q.config, sym=True)
    for fmt, word in (("gptq", 0x77777777), ("gptq_v2", 0x88888888)):
        d = gptq_export.export(str(tmp_path / f"sym_{fmt}"), sym, q.lm, cfg, checkpoint_format=fmt)
        tensors = load_file(os.path.join(d, "model.safetensors"))
        qz = [t for n, t in tensors.items() if n.endswith(".qzeros")]
        assert len(qz) == 14 and all(np.all(t.view(np.uint32) == word) for t in qz)
        assert json.loads(open(os.path.join(d, "config.json")).read())["quantization_config"]["sym"] is True
        _assert_trees_identical(gptq_export.load(d).params, _as_exported(sym))
    # A zero point of 0 wraps to 15 in v1: the export warns, and jaxquant reads it back as 0.
    wrapped = _replace_zeros(q.params, lambda z, _: np.where(np.arange(z.shape[1]) % 5 == 0, 0, z))
    with pytest.warns(UserWarning, match="zero point\\(s\\) are 0"):
        d = gptq_export.export(str(tmp_path / "wrapped"), wrapped, q.lm, q.config)
    z = _np_unpack(load_file(os.path.join(d, "model.safetensors"))["model.layers.0.self_attn.q_proj.qzeros"], 4, 1)
    assert np.all(z[:, ::5] == 15)
    _assert_trees_identical(gptq_export.load(d).params, _as_exported(wrapped))


@pytest.mark.parametrize("family", ["opt", "falcon"])
def test_gptq_export_opt_falcon(tiny_quantized, tiny_hf, tmp_path, rng, family):
    """Canonical *ForCausalLM names (model.decoder.*, transformer.*), biases of quantized linears kept, logits equal."""
    q = tiny_quantized("rtn", family, needs_hessian=True, bits=4, group_size=32)
    d = gptq_export.export(str(tmp_path / family), q.params, q.lm, q.config)
    tensors = load_file(os.path.join(d, "model.safetensors"))
    prefix = {"opt": "model.decoder.layers.0.self_attn.q_proj",
              "falcon": "transformer.h.0.self_attention.dense"}[family]
    assert {prefix + s for s in (".qweight", ".qzeros", ".scales", ".g_idx")} <= set(tensors)
    if family == "opt":
        assert prefix + ".bias" in tensors and "model.decoder.embed_positions.weight" in tensors
    lm = gptq_export.load(d)
    want = _as_exported(q.params)
    _assert_trees_identical(lm.params, want)
    ids = _ids(rng)
    logits = jit_logits(lm.module, lm.params, ids)
    np.testing.assert_array_equal(logits, jit_logits(q.lm.module, want, ids))
    hf = _hf_logits(tiny_hf(family).hf, _reference_state_dict(d, "gptq"), ids)
    assert np.max(np.abs(hf - logits)) <= 1e-4 * np.max(np.abs(hf))


def test_transformers_loads_export(exported, rng):
    """transformers reads GPTQ checkpoints only through optimum + gptqmodel (its GPTQ quantizer raises ImportError
    without them, also on CPU); skipped where they are not installed."""
    pytest.importorskip("optimum", reason="transformers needs optimum + gptqmodel to load GPTQ checkpoints")
    pytest.importorskip("gptqmodel", reason="transformers needs optimum + gptqmodel to load GPTQ checkpoints")
    q, params, _, dirs = exported("4bit")
    ids = _ids(rng)
    want = jit_logits(q.lm.module, _as_exported(params), ids)
    for directory in dirs.values():
        model = transformers.AutoModelForCausalLM.from_pretrained(directory, device_map="cpu").eval()
        with torch.no_grad():
            got = model(torch.from_numpy(ids).long()).logits.float().numpy()
        assert np.max(np.abs(got - want)) <= 1e-2 * np.max(np.abs(want))


def _broken(exported, tmp_path, edit_tensors=None, edit_config=None, edit_qfile=None, fmt="gptq"):
    src = exported("4bit")[3][fmt]
    path = tmp_path / "broken"
    shutil.copytree(src, path)
    if edit_tensors:
        tensors = load_file(str(path / "model.safetensors"))
        edit_tensors(tensors)
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    for edit, name in ((edit_config, "config.json"), (edit_qfile, "quantize_config.json")):
        if edit:
            cfg = json.loads((path / name).read_text())
            edit(cfg.get("quantization_config", cfg) if name == "config.json" else cfg)
            (path / name).write_text(json.dumps(cfg))
    return str(path)


L0Q = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("case,message", [
    ("missing scales", f"missing tensor {L0Q}.scales"),
    ("missing qweight of a layer", "missing tensor model.layers.1.mlp.up_proj.qweight"),
    ("scales wrong shape", f"tensor {L0Q}.scales has shape (1, 64), expected (2, 64)"),
    ("qzeros wrong dtype", f"tensor {L0Q}.qzeros is int64, expected int32"),
    ("g_idx out of range", f"tensor {L0Q}.g_idx must hold group indices in [0, 2)"),
    ("bits 5", "GPTQ bits=5 is not supported"),
    ("quant_method awq", "quant_method='awq' is not supported"),
    ("checkpoint_format marlin", "checkpoint_format='marlin' is not supported"),
    ("config files disagree", "quantization_config has group_size=32 but quantize_config.json has 64"),
])
def test_broken_gptq_export_is_rejected(exported, tmp_path, case, message):
    def drop(*names):
        return lambda t: [t.pop(n) for n in names]

    up = "model.layers.1.mlp.up_proj"
    edits = {
        "missing scales": dict(edit_tensors=drop(f"{L0Q}.scales")),
        "missing qweight of a layer": dict(edit_tensors=drop(*(f"{up}.{s}" for s in ("qweight", "qzeros", "scales",
                                                                                       "g_idx")))),
        "scales wrong shape": dict(edit_tensors=lambda t: t.update({f"{L0Q}.scales": t[f"{L0Q}.scales"][:1]})),
        "qzeros wrong dtype": dict(
            edit_tensors=lambda t: t.update({f"{L0Q}.qzeros": t[f"{L0Q}.qzeros"].astype(np.int64)})),
        "g_idx out of range": dict(edit_tensors=lambda t: t.update({f"{L0Q}.g_idx": np.where(
            np.arange(t[f"{L0Q}.g_idx"].size) == 3, 2, t[f"{L0Q}.g_idx"]).astype(np.int32)})),
        "bits 5": dict(edit_config=lambda c: c.update(bits=5), edit_qfile=lambda c: c.update(bits=5)),
        "quant_method awq": dict(edit_config=lambda c: c.update(quant_method="awq")),
        "checkpoint_format marlin": dict(edit_config=lambda c: c.update(checkpoint_format="marlin", format="marlin"),
                                         edit_qfile=lambda c: c.update(checkpoint_format="marlin", format="marlin")),
        "config files disagree": dict(edit_qfile=lambda c: c.update(group_size=64)),
    }
    path = _broken(exported, tmp_path, **edits[case])
    with pytest.raises(CheckpointError) as err:
        gptq_export.load(path)
    assert message in str(err.value)


def test_export_refuses_non_empty_directory_and_dense_params(tiny_quantized, tmp_path):
    q = tiny_quantized("rtn", **RUNS["rtn"])
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        gptq_export.export(str(tmp_path / "taken"), q.params, q.lm, q.config)
    assert os.listdir(tmp_path / "taken") == ["keep.txt"]
    with pytest.raises(ValueError, match="no quantized"):
        gptq_export.export(str(tmp_path / "dense"), q.lm.params, q.lm, q.config)
    with pytest.raises(ValueError, match="checkpoint_format"):
        gptq_export.export(str(tmp_path / "v3"), q.params, q.lm, q.config, checkpoint_format="gptq_v3")


def _strided(a: np.ndarray, rng) -> np.ndarray:
    """The same values as ``a`` in a non-contiguous view (every other column of a larger random array)."""
    big = rng.integers(-2**30, 2**30, size=(a.shape[0], 2 * a.shape[1])).astype(a.dtype)
    big[:, ::2] = a
    view = big[:, ::2]
    assert not view.flags.c_contiguous and np.array_equal(view, a)
    return view


def test_gptq_export_writes_strided_arrays_correctly(tiny_quantized, tmp_path, rng):
    """Quantized arrays that are numpy views (e.g. output slices of a jointly solved q/k/v weight) must be written
    with their values: safetensors.numpy would write a strided view's raw buffer."""
    q = tiny_quantized("rtn", **RUNS["rtn"])
    host = jax.tree_util.tree_map(np.asarray, q.params)

    def strided(leaf):
        if not isinstance(leaf, UniformQuantizedWeight):
            return leaf
        arrays = {f: _strided(np.asarray(getattr(leaf, f)), rng) for f in ("qweight", "qzeros", "scales")}
        return dataclasses.replace(leaf, **arrays)

    views = jax.tree_util.tree_map(strided, host, is_leaf=lambda x: isinstance(x, UniformQuantizedWeight))
    for fmt in gptq_export.CHECKPOINT_FORMATS:
        plain = gptq_export.load(gptq_export.export(str(tmp_path / f"plain_{fmt}"), host, q.lm, q.config,
                                                    checkpoint_format=fmt), tokenizer=False)
        strided_load = gptq_export.load(gptq_export.export(str(tmp_path / f"views_{fmt}"), views, q.lm, q.config,
                                                           checkpoint_format=fmt), tokenizer=False)
        _assert_trees_identical(plain.params, strided_load.params)
