"""Sampling helpers shared by every stage: K samples per prompt (align.generation) and the
held-out sample-and-score helper (align.evaluation), on a real tiny model."""

import statistics

import pytest
import torch

from align.config import ModelConfig
from align.evaluation import bootstrap_ci, held_out_report, sample_and_score, sample_summary
from align.generation import SamplingConfig, groups, sample, sample_per_prompt
from align.models.builders import build_causal_lm
from align.task.synthetic import gold_score, is_fluent

SAMPLING = SamplingConfig(max_new_tokens=12, temperature=1.0)


@pytest.fixture(scope="module")
def generate(builtin_tokenizer):
    model = build_causal_lm(ModelConfig(name_or_path="builtin:tiny-1m"), builtin_tokenizer, seed=5).eval()

    def gen(input_ids, attention_mask, **kwargs):
        with torch.no_grad():
            return model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    return gen


@pytest.fixture(scope="module")
def prompts(builtin_tokenizer):
    texts = ["Review the movie Iron Road.", "Write a review of Paper Moon.", "Review Blue Hour."]
    ids = [builtin_tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                                 tokenize=False) for t in texts]
    return [builtin_tokenizer(s, add_special_tokens=False)["input_ids"] for s in ids], texts


def test_k_samples_per_prompt_are_rows_of_one_sample_call(generate, builtin_tokenizer, prompts):
    ids, _ = prompts
    out = sample_per_prompt(generate, builtin_tokenizer, ids, 3, SAMPLING, micro_batch_size=4, seed=11)
    same = sample(generate, builtin_tokenizer, [p for p in ids for _ in range(3)], SAMPLING, 4, seed=11)
    assert out.prompt_ids == [list(p) for p in ids for _ in range(3)]
    assert out.response_ids == same.response_ids and out.texts == same.texts
    assert [g[0] for g in groups(out.prompt_ids, 3)] == [list(p) for p in ids]
    assert groups(list(range(6)), 3) == [[0, 1, 2], [3, 4, 5]]


def test_sample_and_score_scores_with_the_task(generate, builtin_tokenizer, prompts):
    ids, texts = prompts
    scored = sample_and_score(generate, builtin_tokenizer, ids, texts, SAMPLING, seed=3,
                              task_paths=["builtin:eval_prompts"])
    out = scored.samples
    assert out.texts == sample(generate, builtin_tokenizer, ids, SAMPLING, seed=3).texts  # same seed, same samples
    assert scored.gold == [gold_score(p, t) for p, t in zip(texts, out.texts)]
    assert scored.task_metrics == {"fluent": sum(map(is_fluent, out.texts)) / 3}
    summary = sample_summary(scored, ci_seed=3)
    assert summary["samples/n"] == 3
    assert summary["samples/eos_rate"] == sum(out.ended_with_eos) / 3
    assert summary["samples/length"] == statistics.mean(len(r) for r in out.response_ids)
    assert summary["samples/gold"] == statistics.mean(scored.gold)
    assert (summary["samples/gold_ci_low"], summary["samples/gold_ci_high"]) == bootstrap_ci(scored.gold, seed=3)
    assert summary["samples/fluent"] == scored.task_metrics["fluent"]
    assert summary["samples/examples"] == out.texts[:3]
    # Without a CI seed (SFT's final samples): no n, no CI.
    assert set(sample_summary(scored)) == {"samples/eos_rate", "samples/length", "samples/gold", "samples/fluent",
                                           "samples/examples"}
    rows = {"prompt_ids": ids, "prompt_text": texts}
    assert held_out_report(generate, builtin_tokenizer, rows, SAMPLING, 3, ["builtin:eval_prompts"]) == summary


def test_user_data_has_no_gold_and_no_task_metrics(generate, builtin_tokenizer, prompts, tmp_path):
    ids, texts = prompts
    scored = sample_and_score(generate, builtin_tokenizer, ids, texts, SAMPLING, seed=3,
                              task_paths=[str(tmp_path / "prompts.jsonl")])
    assert scored.gold is None and scored.task_metrics == {}
    assert set(sample_summary(scored, "x/", ci_seed=1)) == {"x/eos_rate", "x/length", "x/n", "x/examples"}
