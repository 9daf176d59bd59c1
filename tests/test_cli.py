"""The command line on a tiny random LLaMA saved with the SmolLM2 tokenizer: eval writes a result row (perplexity
checked against transformers), generate prints the decoded tokens, and bad arguments fail with clear messages."""
from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import models  # noqa: E402
from jaxquant import cli  # noqa: E402
from jaxquant.cli import main  # noqa: E402
from models.generate import generate  # noqa: E402

TEXT = ("The committee met on Tuesday to discuss the new bridge over the river. After a long debate, the members "
        "agreed that construction should begin in the spring, once the ground has thawed and the roads are clear. "
        "Several residents asked about the noise, and the chair promised regular updates on the town website.")


@pytest.fixture(scope="module")
def model_dir(tiny_llama, smollm2_tokenizer, tmp_path_factory):
    """The tiny LLaMA with vocab_size = len(tokenizer), copied next to the saved tokenizer files."""
    tok = smollm2_tokenizer
    b = tiny_llama(vocab_size=len(tok))
    directory = tmp_path_factory.mktemp("cli_model")
    shutil.copytree(b.dir, directory, dirs_exist_ok=True)
    tok.save_pretrained(str(directory))
    assert (directory / "tokenizer.json").exists()
    return b, directory


def test_eval_writes_row(model_dir, tmp_path, capsys):
    b, directory = model_dir
    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT)
    out = tmp_path / "results" / "rows.json"
    argv = ["eval", "--model", str(directory), "--dataset", str(text_file), "--seqlen", "16", "--max-windows", "2",
            "--out", str(out)]
    assert main(argv) == 0
    rows = json.loads(out.read_text())
    assert isinstance(rows, list) and len(rows) == 1
    row = rows[0]
    for key in ("benchmark", "command", "device", "jax", "jaxlib", "date"):
        assert row.get(key), key
    assert row["benchmark"] == "perplexity" and row["nsamples"] == 2 and row["seqlen"] == 16
    assert row["model"] == str(directory) and row["dataset"] == str(text_file) and row["method"] == "fp32"
    assert row["command"].startswith("jaxquant eval ") and "--max-windows 2" in row["command"]
    assert math.isfinite(row["ppl"]) and row["ppl"] > 1
    # Printed too.
    assert json.loads(capsys.readouterr().out)["ppl"] == row["ppl"]

    # The number itself: the GPTQ protocol on the same tokens, computed with the transformers model.
    tok = models.load_tokenizer(str(directory))
    ids = np.asarray(tok(TEXT)["input_ids"])
    assert ids.size >= 32
    total = 0.0
    with torch.no_grad():
        for i in range(2):
            w = torch.from_numpy(ids[i * 16:(i + 1) * 16].astype(np.int64))[None]
            logits = b.hf(w, use_cache=False).logits.double()
            total += float(torch.nn.functional.cross_entropy(logits[0, :-1], w[0, 1:])) * 16
    ref = math.exp(total / 32)
    assert abs(row["ppl"] - ref) <= 1e-5 * ref, (row["ppl"], ref)

    # A second run appends a row.
    main(argv)
    assert len(json.loads(out.read_text())) == 2


def test_generate_prints_text(model_dir, capsys):
    b, directory = model_dir
    prompt = "Once upon a time"
    assert main(["generate", "--model", str(directory), "--prompt", prompt, "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out
    lm = models.from_pretrained(str(directory))
    tok = lm.tokenizer
    expected = generate(lm.module, lm.params, [tok(prompt)["input_ids"]], max_new_tokens=6,
                        eos_id=tok.eos_token_id)[0]
    text = tok.decode(expected, skip_special_tokens=True)
    assert expected and f"### {prompt}\n{text}\n" in printed, printed


def test_bad_dtype(model_dir, capsys):
    _, directory = model_dir
    with pytest.raises(SystemExit) as err:
        main(["eval", "--model", str(directory), "--dtype", "float8"])
    assert err.value.code == 2
    assert "invalid choice: 'float8'" in capsys.readouterr().err


def test_unknown_model_dir(tmp_path):
    missing = str(tmp_path / "no_such_model")
    with pytest.raises(FileNotFoundError, match="is neither a local directory") as err:
        main(["generate", "--model", missing, "--prompt", "hi"])
    assert missing in str(err.value)


@pytest.mark.parametrize("command", ["eval", "generate"])
def test_model_without_tokenizer(tiny_llama, tmp_path, command):
    extra = ["--dataset", str(tmp_path / "t.txt")] if command == "eval" else ["--prompt", "hi"]
    (tmp_path / "t.txt").write_text(TEXT)
    with pytest.raises(SystemExit, match="has no tokenizer files"):
        main([command, "--model", tiny_llama().dir, *extra])


def test_with_deterministic_gpu_ops_adds_flag_once():
    assert cli.with_deterministic_gpu_ops("") == "--xla_gpu_deterministic_ops=true"
    assert cli.with_deterministic_gpu_ops("--xla_foo=1") == "--xla_foo=1 --xla_gpu_deterministic_ops=true"
    assert cli.with_deterministic_gpu_ops("--xla_gpu_deterministic_ops=false") == "--xla_gpu_deterministic_ops=false"


@pytest.mark.parametrize("flag, expected", [([], "--xla_foo=1 --xla_gpu_deterministic_ops=true"),
                                            (["--no-gpu-deterministic"], "--xla_foo=1")])
def test_quantize_sets_deterministic_gpu_ops_before_jax_runs(tmp_path, monkeypatch, flag, expected):
    monkeypatch.setenv("XLA_FLAGS", "--xla_foo=1")
    with pytest.raises(Exception):  # the model does not exist: fails after the flags are set
        cli.main(["quantize", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "out"), *flag])
    assert os.environ["XLA_FLAGS"] == expected
