"""Model layer: the tiny built-in family, scalar scoring, Hugging Face save/load, tokenizer."""

import json
import os
import subprocess
import sys

import pytest
import torch

from align.config import ModelConfig
from align.models.builders import (
    TINY_MODELS,
    build_causal_lm,
    build_scalar_model,
    build_tokenizer,
    count_parameters,
    last_token_index,
    save_pretrained,
    sequence_scores,
    tiny_llama_config,
    token_scalars,
)

TEXT = "The music was very charming. The plot was dull."


@pytest.fixture(scope="module")
def lm(builtin_tokenizer):
    return build_causal_lm(ModelConfig(), builtin_tokenizer, seed=0).eval()


@pytest.fixture(scope="module")
def scorer(builtin_tokenizer):
    return build_scalar_model(ModelConfig(), builtin_tokenizer, seed=0).eval()


def encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


@pytest.mark.parametrize("name", ["builtin:tiny-1m", "builtin:tiny-8m"])
def test_tiny_parameter_count(name, builtin_tokenizer):
    c = tiny_llama_config(name, builtin_tokenizer)
    V, h, i, L = c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers
    assert c.num_key_value_heads == c.num_attention_heads and c.tie_word_embeddings
    # Tied embedding; per layer q,k,v,o (4h^2), gate/up/down (3hi), two RMSNorms; final norm.
    expected = V * h + L * (4 * h * h + 3 * h * i + 2 * h) + h
    model = build_causal_lm(ModelConfig(name_or_path=name), builtin_tokenizer)
    assert count_parameters(model) == expected
    assert expected == {"builtin:tiny-1m": 869_504, "builtin:tiny-8m": 6_557_952}[name]


def test_unknown_builtin_model_is_rejected(builtin_tokenizer):
    with pytest.raises(ValueError, match="builtin:tiny-2m"):
        build_causal_lm(ModelConfig(name_or_path="builtin:tiny-2m"), builtin_tokenizer)
    assert "builtin:tiny-30m" in TINY_MODELS


def test_seed_determines_weights(builtin_tokenizer):
    a = build_causal_lm(ModelConfig(), builtin_tokenizer, seed=1).state_dict()
    b = build_causal_lm(ModelConfig(), builtin_tokenizer, seed=1).state_dict()
    c = build_causal_lm(ModelConfig(), builtin_tokenizer, seed=2).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(a[key], c[key])
    # Building does not consume the global RNG.
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    build_causal_lm(ModelConfig(), builtin_tokenizer, seed=5)
    assert torch.equal(torch.rand(3), before)


def test_dtype(builtin_tokenizer):
    model = build_causal_lm(ModelConfig(dtype="bfloat16"), builtin_tokenizer)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_scalar_model_scores_shape(scorer, builtin_tokenizer):
    tok = builtin_tokenizer
    batch = tok([TEXT, "The cast was great."], padding=True, return_tensors="pt")
    with torch.no_grad():
        scores = sequence_scores(scorer, batch["input_ids"], batch["attention_mask"])
        values = token_scalars(scorer, batch["input_ids"], batch["attention_mask"])
    assert scores.shape == (2,)
    assert values.shape == batch["input_ids"].shape
    last = batch["attention_mask"].sum(1) - 1
    assert scores.tolist() == [values[0, last[0]].item(), values[1, last[1]].item()]
    assert scores[0].item() != scores[1].item()


def test_last_token_index_by_hand():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert last_token_index(right).tolist() == [2, 4, 0]
    assert last_token_index(left).tolist() == [4, 4, 4]


def test_sequence_scores_left_and_right_padding_agree(scorer, builtin_tokenizer):
    tok = builtin_tokenizer
    ids = encode(tok, TEXT)
    n, P, pad = len(ids), 3, tok.pad_token_id
    right = torch.tensor([ids + [pad] * P]), torch.tensor([[1] * n + [0] * P])
    left = torch.tensor([[pad] * P + ids]), torch.tensor([[0] * P + [1] * n])
    plain = torch.tensor([ids]), torch.ones(1, n, dtype=torch.long)
    with torch.no_grad():
        r, l, p = (sequence_scores(scorer, *x) for x in (right, left, plain))
        # The whole per-token profile of the real tokens agrees too, not only the last one.
        vr = token_scalars(scorer, *right)[0, :n]
        vl = token_scalars(scorer, *left)[0, P:]
    assert r.item() == pytest.approx(p.item(), abs=1e-5)
    assert l.item() == pytest.approx(p.item(), abs=1e-5)
    assert torch.allclose(vr, vl, atol=1e-5)


def test_sequence_scores_when_pad_equals_eos(scorer, builtin_tokenizer):
    tok = builtin_tokenizer
    ids = encode(tok, TEXT)  # ends with EOS
    n, P, eos = len(ids), 3, tok.eos_token_id
    padded = torch.tensor([ids + [eos] * P])
    mask = torch.tensor([[1] * n + [0] * P])
    with torch.no_grad():
        score = sequence_scores(scorer, padded, mask)
        alone = sequence_scores(scorer, torch.tensor([ids]), torch.ones(1, n, dtype=torch.long))
        values = token_scalars(scorer, padded, mask)[0]
    assert score.item() == pytest.approx(alone.item(), abs=1e-5)
    assert score.item() == values[n - 1].item()
    # Pooling by pad_token_id would read before the first EOS (n - 2), or at the last position.
    assert abs(values[n - 2].item() - alone.item()) > 1e-4
    assert abs(values[-1].item() - alone.item()) > 1e-4


def test_trust_remote_code_off_by_default():
    assert ModelConfig().trust_remote_code is False


def test_save_pretrained_round_trip_causal_lm(lm, builtin_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    out = save_pretrained(lm, builtin_tokenizer, str(tmp_path / "policy"))
    files = set(os.listdir(out))
    assert "model.safetensors" in files and "config.json" in files
    assert not any(f.endswith(".bin") for f in files)
    assert not any(f.startswith(".tmp-export-") for f in os.listdir(tmp_path))

    ids = torch.tensor([encode(builtin_tokenizer, TEXT)])
    with torch.no_grad():
        expected = lm(input_ids=ids).logits
        reloaded = AutoModelForCausalLM.from_pretrained(out).eval()(input_ids=ids).logits
        # The hub-loading branch of build_causal_lm, on local files.
        built = build_causal_lm(ModelConfig(name_or_path=out), builtin_tokenizer).eval()(input_ids=ids).logits
    assert torch.equal(reloaded, expected)
    assert torch.equal(built, expected)

    # Saving over an existing export replaces it.
    save_pretrained(lm, builtin_tokenizer, out, extra_config={"stage": "sft"})
    with open(os.path.join(out, "config.json")) as fh:
        assert json.load(fh)["stage"] == "sft"


def test_save_pretrained_round_trip_scalar_model(scorer, builtin_tokenizer, tmp_path):
    from transformers import AutoModelForSequenceClassification

    out = save_pretrained(scorer, builtin_tokenizer, str(tmp_path / "rm"),
                          extra_config={"reward_mean": 0.25, "reward_std": 2.0})
    assert "model.safetensors" in os.listdir(out)
    assert not any(f.endswith(".bin") for f in os.listdir(out))
    reloaded = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert reloaded.config.reward_mean == 0.25 and reloaded.config.reward_std == 2.0
    assert reloaded.config.num_labels == 1
    built = build_scalar_model(ModelConfig(name_or_path=out), builtin_tokenizer, seed=7).eval()

    batch = builtin_tokenizer([TEXT, "The cast was great."], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = sequence_scores(scorer, batch["input_ids"], batch["attention_mask"])
        got = sequence_scores(reloaded, batch["input_ids"], batch["attention_mask"])
        got_built = sequence_scores(built, batch["input_ids"], batch["attention_mask"])
    assert torch.equal(got, expected)
    # A saved head is loaded, not re-initialised from the seed.
    assert torch.equal(got_built, expected)


def test_scalar_model_from_causal_lm_checkpoint(lm, builtin_tokenizer, tmp_path):
    # A reward model starts from the SFT output: backbone reused, new head from the seed.
    out = save_pretrained(lm, builtin_tokenizer, str(tmp_path / "sft"))
    a = build_scalar_model(ModelConfig(name_or_path=out), builtin_tokenizer, seed=3)
    b = build_scalar_model(ModelConfig(name_or_path=out), builtin_tokenizer, seed=3)
    key = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(a.state_dict()[key], lm.state_dict()[key])
    assert torch.equal(a.score.weight, b.score.weight)
    assert a.score.weight.shape == (1, lm.config.hidden_size)


def test_tokenizer_save_and_reload(builtin_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tok = builtin_tokenizer
    tok.save_pretrained(str(tmp_path / "tok"))
    again = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    messages = [{"role": "user", "content": "Review the movie Night Harbor."},
                {"role": "assistant", "content": "The music was very charming."}]
    assert again.chat_template == tok.chat_template
    assert again.apply_chat_template(messages, tokenize=False) == tok.apply_chat_template(messages, tokenize=False)
    assert tok.apply_chat_template(messages, tokenize=False) == (
        "<|user|>Review the movie Night Harbor.\n<|assistant|>The music was very charming.\n"
    )
    for text in [TEXT, "Unseen wörds: zebra 123!", tok.apply_chat_template(messages, tokenize=False)]:
        assert again(text)["input_ids"] == tok(text)["input_ids"]
        assert again.decode(again(text)["input_ids"]) == text
    assert (again.pad_token_id, again.bos_token_id, again.eos_token_id) == (
        tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)
    assert again.convert_tokens_to_ids("<|assistant|>") == tok.convert_tokens_to_ids("<|assistant|>")
    # A role token is one token, not split into pieces.
    assert len(tok("<|assistant|>", add_special_tokens=False)["input_ids"]) == 1
    # Loaded by directory through the model layer too.
    via_cfg = build_tokenizer(ModelConfig(name_or_path=str(tmp_path / "tok")))
    assert via_cfg(TEXT)["input_ids"] == tok(TEXT)["input_ids"]


def vocab_digest(tokenizer):
    import hashlib

    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()


def test_tokenizer_is_deterministic(builtin_tokenizer):
    from align.models import tokenizer as tokenizer_module

    first = builtin_tokenizer
    tokenizer_module._builtin_tokenizer_json.cache_clear()  # retrain, do not reuse the cache
    second = tokenizer_module.build_builtin_tokenizer()
    assert second.get_vocab() == first.get_vocab()
    assert vocab_digest(second) == vocab_digest(first)
    assert len(first) == 512

    # In another process with another hash seed (set iteration order differs).
    code = (
        "import hashlib\n"
        "from align.models.tokenizer import build_builtin_tokenizer\n"
        "t = build_builtin_tokenizer()\n"
        "print(hashlib.sha256(t.backend_tokenizer.to_str().encode()).hexdigest())\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == vocab_digest(first)
