"""GPTQ-protocol perplexity against an independent torch/numpy computation, and the evaluation / calibration data."""
from __future__ import annotations

import hashlib
import json
import math
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from jaxquant import data  # noqa: E402
from jaxquant.eval import perplexity  # noqa: E402

SEQLEN = 16


def _reference_ppl(hf, ids, seqlen, max_windows=None):
    """The GPTQ reference loop (llama_eval): nsamples = numel // seqlen windows, mean shifted CE * seqlen each."""
    nsamples = ids.size // seqlen
    if max_windows is not None:
        nsamples = min(nsamples, max_windows)
    nlls = []
    with torch.no_grad():
        for i in range(nsamples):
            window = torch.from_numpy(ids[i * seqlen:(i + 1) * seqlen].astype(np.int64))[None]
            logits = hf(window, use_cache=False).logits.double()
            loss = torch.nn.functional.cross_entropy(logits[0, :-1], window[0, 1:])
            nlls.append(float(loss) * seqlen)
    return math.exp(sum(nlls) / (nsamples * seqlen)), nsamples


@pytest.mark.parametrize("batch_size,max_windows", [(1, None), (2, None), (2, 3), (4, None)])
def test_perplexity_matches_reference(tiny_llama, rng, batch_size, max_windows):
    b = tiny_llama()
    ids = rng.integers(0, 128, size=int(5.5 * SEQLEN)).astype(np.int32)  # 5.5 windows: the half is dropped
    ref, nsamples = _reference_ppl(b.hf, ids, SEQLEN, max_windows)
    out = perplexity(b.loaded.module, b.loaded.params, ids, seqlen=SEQLEN, batch_size=batch_size,
                     max_windows=max_windows, progress=False)
    assert out["nsamples"] == nsamples == (3 if max_windows else 5)
    assert out["eval_tokens"] == nsamples * SEQLEN and out["total_tokens"] == ids.size and out["seqlen"] == SEQLEN
    assert abs(out["ppl"] - ref) <= 1e-5 * ref, (out["ppl"], ref)


def test_perplexity_needs_one_window(tiny_llama):
    b = tiny_llama()
    with pytest.raises(ValueError, match="fewer than seqlen=16"):
        perplexity(b.loaded.module, b.loaded.params, np.arange(15, dtype=np.int32), seqlen=SEQLEN, progress=False)


# ------------------------------------------------------------------------------------------------------------ data
needs_data = pytest.mark.skipif(data.data_dir() is None, reason="shared data directory not found")


@needs_data
def test_wikitext2_text():
    text = data.eval_text("wikitext2")
    assert len(text) == 1_294_336
    assert hashlib.sha256(text.encode("utf-8")).hexdigest().startswith("696cca6b65a171b0")


@needs_data
def test_ptb_text_is_lines_joined_with_space():
    raw = (data.data_dir() / data.FILES["ptb"]).read_text()
    lines = raw.split("\n")
    assert len(lines) == 3761 and lines[-1]  # the file has no final newline
    text = data.eval_text("ptb")
    assert text == " ".join(lines)
    assert "\n" not in text and text.count(" ") >= 3760


@needs_data
def test_c4_heldout_is_last_100_documents():
    with open(data.data_dir() / data.FILES["c4"]) as f:
        docs = [json.loads(line)["text"] for line in f if line.strip()]
    assert len(docs) == 1000
    assert data.eval_text("c4-heldout") == "\n\n".join(docs[900:])


def test_ptb_join_and_data_dir_resolution(tmp_path, monkeypatch):
    """$JAXQUANT_DATA is honoured; a trailing newline does not add an empty sentence."""
    (tmp_path / "ptb_test.txt").write_text("the cat sat\n a dog <unk> ran \nend\n")
    monkeypatch.setenv("JAXQUANT_DATA", str(tmp_path))
    assert data.data_dir() == tmp_path
    assert data.eval_text("ptb") == "the cat sat  a dog <unk> ran  end"
    (tmp_path / "ptb_test.txt").write_text("a b\nc")
    assert data.eval_text("ptb", directory=str(tmp_path)) == "a b c"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="has none of"):
        data.data_dir(str(empty))


def test_text_file_dataset(tmp_path, rng):
    path = tmp_path / "t.txt"
    text = "".join(rng.choice(list("abc \n")) for _ in range(200))
    path.write_text(text)
    assert data.eval_text(str(path)) == text


def test_unknown_dataset_and_source():
    with pytest.raises(ValueError, match="unknown dataset 'wikitext7'"):
        data.eval_text("wikitext7")
    with pytest.raises(ValueError, match="unknown calibration source 'pile'"):
        data.calibration_windows(ByteTokenizer(), n=2, seqlen=8, source="pile")


class ByteTokenizer:
    """Stand-in tokenizer: one token per UTF-8 byte (so a window maps back to a substring)."""

    def __call__(self, text, return_tensors=None):
        return {"input_ids": np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int64)[None]}


def _assert_contiguous(windows, stream: bytes):
    starts = []
    for w in windows:
        s = stream.find(bytes(w.astype(np.uint8).tolist()))
        assert s >= 0, "window is not a contiguous slice of the token stream"
        starts.append(s)
    return starts


def test_calibration_windows_text_file(tmp_path, rng):
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=int(rng.integers(2, 9))))
             for _ in range(600)]
    text = " ".join(words)
    path = tmp_path / "calib.txt"
    path.write_text(text)
    n, seqlen, seed = 8, 64, int(rng.integers(1 << 30))
    a = data.calibration_windows(ByteTokenizer(), n=n, seqlen=seqlen, seed=seed, source=str(path))
    b = data.calibration_windows(ByteTokenizer(), n=n, seqlen=seqlen, seed=seed, source=str(path))
    c = data.calibration_windows(ByteTokenizer(), n=n, seqlen=seqlen, seed=seed + 1, source=str(path))
    assert a.shape == (n, seqlen) and a.dtype == np.int32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    starts = _assert_contiguous(a, text.encode())
    assert len(set(starts)) > 1  # random offsets, not one window repeated
    _assert_contiguous(c, text.encode())
    with pytest.raises(ValueError, match="fewer than seqlen"):
        data.calibration_windows(ByteTokenizer(), n=2, seqlen=len(text) + 1, source=str(path))


@needs_data
@pytest.mark.parametrize("source", ["c4", "wikitext2"])
def test_calibration_windows_sources(source):
    """c4: slices of the first 900 documents joined with blank lines; wikitext2: slices of the train excerpt."""
    d = data.data_dir()
    if source == "c4":
        with open(d / data.FILES["c4"]) as f:
            docs = [json.loads(line)["text"] for line in f if line.strip()]
        stream = "\n\n".join(docs[:900]).encode()
        heldout = "\n\n".join(docs[900:]).encode()
    else:
        stream, heldout = (d / data.FILES["wikitext2-train"]).read_bytes(), b""
    seed = int.from_bytes(os.urandom(2), "little")
    windows = data.calibration_windows(ByteTokenizer(), n=6, seqlen=256, seed=seed, source=source)
    assert windows.shape == (6, 256)
    _assert_contiguous(windows, stream)
    if heldout:
        assert all(heldout.find(bytes(w.astype(np.uint8).tolist())) < 0 for w in windows)


def test_calibration_windows_real_tokenizer(smollm2_tokenizer, tmp_path):
    tok = smollm2_tokenizer
    path = tmp_path / "calib.txt"
    path.write_text(" ".join(f"The {i}th sample sentence says {i * 7 % 13} things." for i in range(80)))
    ids = np.asarray(tok(path.read_text())["input_ids"])
    seed = int.from_bytes(os.urandom(2), "little")
    w = data.calibration_windows(tok, n=4, seqlen=64, seed=seed, source=str(path))
    assert w.shape == (4, 64) and ids.size > 64
    view = np.lib.stride_tricks.sliding_window_view(ids, 64)
    for row in w:
        assert np.any(np.all(view == row, axis=1))
    np.testing.assert_array_equal(w, data.calibration_windows(tok, n=4, seqlen=64, seed=seed, source=str(path)))
