"""Chat templates: prompts are formatted with the tokenizer's template (generation prompt
added), and the loss/response mask covers exactly the assistant's tokens and its end-of-turn
token; sampling stops at that token. Checked by decoding the masked tokens under the real
SmolLM2 tokenizer, and on the built-in tokenizer with a template whose end of turn is not EOS."""

import json

import pytest
import torch

from align.config import DataConfig, SourceConfig
from align.models.tokenizer import build_builtin_tokenizer, end_of_turn_id, stop_token_ids

SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


def load(tmp_path, kind, rows, tokenizer):
    from align.data.sources import load_rows
    from align.data.tokenize import tokenize_rows

    path = tmp_path / f"{kind}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(train=[SourceConfig(path=str(path))], max_length=256, max_prompt_length=200)
    return tokenize_rows(load_rows(cfg.train, kind, cfg, seed=0), kind, tokenizer, cfg)


def masked(tokenizer, ids, mask):
    return tokenizer.decode([t for t, m in zip(ids, mask) if m])


def unmasked(tokenizer, ids, mask):
    return tokenizer.decode([t for t, m in zip(ids, mask) if not m])


@pytest.fixture(scope="module")
def smol_tokenizer(smollm2_dir):
    from align.models.tokenizer import load_tokenizer

    return load_tokenizer(smollm2_dir)


def test_sft_rows_single_and_multi_turn(smol_tokenizer, tmp_path):
    tok = smol_tokenizer
    assert end_of_turn_id(tok) == tok.convert_tokens_to_ids("<|im_end|>") and stop_token_ids(tok) == [2]
    rows = load(tmp_path, "sft", [
        {"prompt": "What is 2+2?", "completion": "4."},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
                      {"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]},
    ], tok)
    (ids0, ids1), (m0, m1) = rows["input_ids"], rows["loss_mask"]
    assert masked(tok, ids0, m0) == "4.<|im_end|>"
    assert unmasked(tok, ids0, m0) == SYSTEM + "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    # Multi-turn: earlier turns are prompt; the mask covers the last assistant turn and its end.
    assert masked(tok, ids1, m1) == "Blue.<|im_end|>"
    assert unmasked(tok, ids1, m1) == (SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
                                       "Hello! How can I help?<|im_end|>\n<|im_start|>user\nName a colour.<|im_end|>\n"
                                       "<|im_start|>assistant\n")


def test_dpo_pair_both_sides(smol_tokenizer, tmp_path):
    from align.data.collate import collate_pairwise

    tok = smol_tokenizer
    rows = load(tmp_path, "pairwise", [{"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Rome."}], tok)
    batch = collate_pairwise([rows[0]], tok.pad_token_id)
    ids, mask = batch["input_ids"].tolist(), batch["loss_mask"].tolist()
    assert [masked(tok, i, m) for i, m in zip(ids, mask)] == ["Paris.<|im_end|>", "Rome.<|im_end|>"]
    prompt = SYSTEM + "<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(rows[0]["prompt_ids"]) == prompt


def test_ppo_rollout_row_stops_at_end_of_turn(smollm2_dir, smol_tokenizer):
    """A greedy rollout of the real model through align.generation.sample, collated the way PPO
    collates rollouts: the masked tokens are the response and its <|im_end|>, nothing after."""
    from transformers import AutoModelForCausalLM

    from align.data.tokenize import encode_prompts
    from align.generation import SamplingConfig, sample
    from align.data.collate import collate_rows

    tok = smol_tokenizer
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    prompts = encode_prompts(tok, [[{"role": "user", "content": "What is the capital of France? Answer in one "
                                                                 "short sentence."}]], [], chat=True)

    def generate(input_ids, attention_mask, **kwargs):
        with torch.no_grad():
            return model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    out = sample(generate, tok, prompts, SamplingConfig(max_new_tokens=24, do_sample=False), micro_batch_size=1)
    assert out.ended_with_eos == [True]
    batch, plens = collate_rows([{"prompt": prompts[0], "response": out.response_ids[0]}], tok.pad_token_id)
    text = masked(tok, batch["input_ids"][0].tolist(), batch["loss_mask"][0].tolist())
    assert text == out.texts[0] + "<|im_end|>"
    assert text == "The capital of France is Paris.<|im_end|>"
    assert plens.tolist() == [len(prompts[0])]


def test_end_of_turn_other_than_eos(tmp_path):
    """A template that closes assistant turns with its own token (as Llama 3's <|eot_id|>):
    responses end with it, and sampling stops at it and at EOS."""
    tok = build_builtin_tokenizer()
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|system|>{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    eot = tok.convert_tokens_to_ids("<|system|>")
    assert end_of_turn_id(tok) == eot != tok.eos_token_id
    assert stop_token_ids(tok) == [eot, tok.eos_token_id]
    rows = load(tmp_path, "sft", [{"prompt": "Review the movie Night Harbor.", "completion": "The plot was dull."}], tok)
    ids, mask = rows["input_ids"][0], rows["loss_mask"][0]
    assert ids[-1] == eot and masked(tok, ids, mask) == "The plot was dull.<|system|>"
    # The built-in template ends a turn with a newline, not a special token: EOS stays the end.
    assert end_of_turn_id(build_builtin_tokenizer()) == tok.eos_token_id
