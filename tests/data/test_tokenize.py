"""Tokenization: masks, chat template, truncation policy, EOS, pairs kept together, packing."""

import datasets
import pytest

from align.data import DataError, DataReport, load_rows, pack_sft, tokenize_rows

PROMPT, RESPONSE = "Write a short review of the film.", "The movie was great."


def encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenized(write, make_cfg, tokenizer, kind, rows, report=None, **kw):
    data = make_cfg([write("rows.jsonl", rows)], **kw)
    return tokenize_rows(load_rows(data.train, kind, data, seed=0), kind, tokenizer, data, report)


def test_sft_masks_prompt_and_ends_with_eos(write, make_cfg, tokenizer):
    row = tokenized(write, make_cfg, tokenizer, "sft", [{"prompt": PROMPT, "completion": RESPONSE}])[0]
    prompt = encode(tokenizer, f"<|user|>{PROMPT}\n<|assistant|>")
    response = encode(tokenizer, RESPONSE) + [tokenizer.eos_token_id]
    assert row["input_ids"] == prompt + response
    assert row["loss_mask"] == [0] * len(prompt) + [1] * len(response)
    assert tokenizer.decode(row["input_ids"]) == f"<|user|>{PROMPT}\n<|assistant|>{RESPONSE}<eos>"
    assert prompt[0] == tokenizer.convert_tokens_to_ids("<|user|>")
    assert prompt[-1] == tokenizer.convert_tokens_to_ids("<|assistant|>")
    assert not row["prompt_truncated"] and not row["response_truncated"]


def test_raw_text_without_chat_template(write, make_cfg, tokenizer):
    rows = [{"chosen": "\n\nHuman: Hi?\n\nAssistant: Hello.", "rejected": "\n\nHuman: Hi?\n\nAssistant: Go away."}]
    row = tokenized(write, make_cfg, tokenizer, "pairwise", rows, use_chat_template=False)[0]
    assert row["prompt_ids"] == encode(tokenizer, "\n\nHuman: Hi?\n\nAssistant:")
    assert row["chosen_ids"] == encode(tokenizer, " Hello.") + [tokenizer.eos_token_id]


def test_truncation_keeps_prompt_end_and_cuts_response_without_eos(write, make_cfg, tokenizer):
    long_prompt, long_response = "the film " * 3, "the movie was great " * 5
    report = DataReport()
    row = tokenized(write, make_cfg, tokenizer, "sft", [{"prompt": long_prompt, "completion": long_response}],
                    report=report, max_length=20, max_prompt_length=8)[0]
    full_prompt = encode(tokenizer, f"<|user|>{long_prompt}\n<|assistant|>")
    assert 8 < len(full_prompt) <= 20
    assert row["input_ids"][:8] == full_prompt[-8:]  # the end, with the generation prompt, is kept
    assert row["input_ids"][8:] == encode(tokenizer, long_response)[:12]
    assert tokenizer.eos_token_id not in row["input_ids"]
    assert row["loss_mask"] == [0] * 8 + [1] * 12
    assert row["prompt_truncated"] and row["response_truncated"]
    assert dict(report) == {"truncated/prompt": 1, "truncated/response": 1}


def test_prompt_longer_than_max_length(write, make_cfg, tokenizer):
    rows = [{"prompt": "ok", "completion": "fine"}, {"prompt": "the film " * 20, "completion": "fine"}]
    with pytest.raises(DataError, match=r"rows.jsonl: row 1, field 'prompt': \d+ tokens, longer than data.max_length=20"):
        tokenized(write, make_cfg, tokenizer, "sft", rows, max_length=20, max_prompt_length=8)
    report = DataReport()
    out = tokenized(write, make_cfg, tokenizer, "sft", rows, report=report, max_length=20, max_prompt_length=8,
                    on_error="drop")
    assert out["row"] == [0] and report["dropped/prompt_too_long"] == 1


def test_pair_sides_share_the_prompt_and_stay_together(write, make_cfg, tokenizer):
    rows = [{"prompt": PROMPT, "chosen": "Great.", "rejected": "the movie was boring " * 6, "margin": 1.5}]
    report = DataReport()
    row = tokenized(write, make_cfg, tokenizer, "pairwise", rows, report=report, max_length=24, max_prompt_length=12)[0]
    assert len(row["prompt_ids"]) == 12
    assert row["chosen_ids"] == encode(tokenizer, "Great.") + [tokenizer.eos_token_id]
    assert len(row["rejected_ids"]) == 12 and row["rejected_ids"][-1] != tokenizer.eos_token_id
    assert (row["chosen_truncated"], row["rejected_truncated"]) == (False, True)
    assert (row["margin"], row["weight"], row["group"]) == (1.5, 1.0, 0)
    assert report["truncated/response"] == 1


def test_binary_prompt_and_ranking_columns(write, make_cfg, tokenizer):
    eos = tokenizer.eos_token_id
    row = tokenized(write, make_cfg, tokenizer, "binary", [{"prompt": PROMPT, "completion": RESPONSE, "label": 1}])[0]
    assert row["completion_ids"] == encode(tokenizer, RESPONSE) + [eos] and row["label"] is True
    row = tokenized(write, make_cfg, tokenizer, "prompt", [{"prompt": PROMPT}])[0]
    assert row["prompt_ids"] == encode(tokenizer, f"<|user|>{PROMPT}\n<|assistant|>")
    assert (row["prompt_text"], row["messages"][0]["content"]) == (PROMPT, PROMPT)
    row = tokenized(write, make_cfg, tokenizer, "ranking", [{"prompt": PROMPT, "responses": ["b", "a"], "scores": [0, 1]}])[0]
    assert row["responses_ids"] == [encode(tokenizer, "a") + [eos], encode(tokenizer, "b") + [eos]]


def test_packing_loses_no_response_token_and_restarts_positions(tokenizer):
    lengths = [(3, 4), (5, 2), (2, 6), (4, 4), (6, 1)]
    rows = [{"input_ids": list(range(100 * i, 100 * i + p + r)), "loss_mask": [0] * p + [1] * r}
            for i, (p, r) in enumerate(lengths)]
    packed = pack_sft(datasets.Dataset.from_list(rows), max_length=16)
    # Example lengths 7, 7, 8, 8, 7: the third does not fit beside the first two.
    assert [len(ids) for ids in packed["input_ids"]] == [14, 16, 7]
    assert sum(packed["input_ids"], []) == sum((r["input_ids"] for r in rows), [])
    assert sum(packed["loss_mask"], []) == sum((r["loss_mask"] for r in rows), [])
    assert packed[0]["position_ids"] == [*range(7), *range(7)]
    assert packed[1]["position_ids"] == [*range(8), *range(8)]
