"""The driver checks and tokenizes the data once; the actors' `load_tokenized` reads the result."""

import os
import time

import datasets
import pytest

from align.config import DataConfig, SourceConfig
from align.data import prepare as prep
from align.stage import load_tokenized
from tests.errors.helpers import pair_rows, write_jsonl


@pytest.fixture(autouse=True)
def fresh_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "align-cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")  # no warm datasets cache


def data_cfg(path, **kw):
    return DataConfig(train=[SourceConfig(path=path)], **{"max_length": 64, "max_prompt_length": 32, **kw})


def test_actors_read_what_the_driver_prepared(tmp_path, builtin_tokenizer):
    cfg = data_cfg(write_jsonl(tmp_path / "pairs.jsonl", pair_rows(300)), eval_fraction=0.1)
    assert prep.load_prepared(cfg, "pairwise", builtin_tokenizer, 0) is None
    train, evals, report = prep.prepare(cfg, "pairwise", builtin_tokenizer, 0)
    cached = load_tokenized(cfg, "pairwise", builtin_tokenizer, 0)  # what a worker calls
    assert cached[0].cache_files[0]["filename"].startswith(prep.cache_root())  # from the cache, not rebuilt
    assert cached[0][:] == train[:] and cached[1][:] == evals[:] and cached[2] == report
    assert (len(train), len(evals)) == (270, 30)


def test_the_key_follows_data_tokenizer_and_config(tmp_path, builtin_tokenizer):
    from align.models.tokenizer import build_builtin_tokenizer

    path = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(50))
    cfg = data_cfg(path)
    key = prep.cache_key(cfg, "pairwise", builtin_tokenizer, 0)
    assert prep.cache_key(cfg, "pairwise", build_builtin_tokenizer(), 0) == key  # same tokenizer, rebuilt
    assert prep.cache_key(data_cfg(path, max_length=65), "pairwise", builtin_tokenizer, 0) != key
    assert prep.cache_key(cfg, "pairwise", builtin_tokenizer, 1) != key
    other = build_builtin_tokenizer()
    other.chat_template = "{{ messages[0]['content'] }}"
    assert prep.cache_key(cfg, "pairwise", other, 0) != key
    write_jsonl(path, pair_rows(51))
    assert prep.cache_key(cfg, "pairwise", builtin_tokenizer, 0) != key


def test_ten_thousand_pairwise_rows_check_in_five_seconds(tmp_path, builtin_tokenizer):
    """Issue 15: loading and checking 10,000 pairwise rows takes at most 5 s on 2 cores."""
    cfg = data_cfg(write_jsonl(tmp_path / "pairs.jsonl", pair_rows(10_000)))
    from align.data.sources import load_splits

    start = time.perf_counter()
    train, _ = load_splits(cfg, "pairwise", 0)
    check_s = time.perf_counter() - start
    start = time.perf_counter()
    prep.prepare(cfg, "pairwise", builtin_tokenizer, 0)
    prepare_s = time.perf_counter() - start
    print(f"10,000 pairwise rows: load + check {check_s:.2f} s; load + check + tokenize + cache "
          f"{prepare_s:.2f} s (cpus: {os.cpu_count()})")
    assert len(train) == 10_000
    assert check_s <= 5.0


@pytest.mark.parametrize("stage, kinds", [
    ("sft", ["sft"]), ("reward_model", ["pairwise"]), ("dpo", ["pairwise", "prompt"]), ("kto", ["binary", "prompt"]),
    ("ppo", ["prompt"]),
])
def test_the_driver_prepares_what_each_stage_loads(stage, kinds):
    """The (data, kind) pairs the driver prepares are the ones each stage's workers load."""
    from align.config import load_config
    from launch.cli import STAGES, config_class

    cfg = load_config(config_class(stage), STAGES[stage][1], ["reward_model=x"] if stage == "ppo" else [])
    jobs = prep.stage_data(cfg)
    assert [kind for _, kind in jobs] == kinds
    assert jobs[0][0] == cfg.data
    if len(jobs) > 1:  # align.stage.load_prompts: the held-out prompts as their own training split
        assert jobs[1][0].train == [cfg.eval_prompts] and jobs[1][0].eval == [] and not jobs[1][0].packing
