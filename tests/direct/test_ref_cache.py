"""The reference log-prob cache: values, keys, hits (in-process, no Ray, plain modules)."""

import os
from functools import partial

import pytest
import torch

from align.config import DataConfig, ModelConfig, SourceConfig
from direct import ref_cache
from align.data.collate import collate_indexed_pairs
from direct.dpo import PAIR_PARTS, PAIR_TOKENS
from direct.reference import with_index


def _pairs(tokenizer, rows=24, max_length=128):
    from align.data.sources import load_rows
    from align.data.tokenize import tokenize_rows

    data = DataConfig(train=[SourceConfig(path="builtin:preferences", max_rows=rows)], max_length=max_length,
                      max_prompt_length=min(48, max_length - 8))
    return with_index(tokenize_rows(load_rows(data.train, "pairwise", data, 0), "pairwise", tokenizer, data))


@pytest.fixture(scope="module")
def model(builtin_tokenizer):
    from align.models.builders import build_causal_lm

    return build_causal_lm(ModelConfig(name_or_path="builtin:tiny-1m"), builtin_tokenizer, seed=3).eval()


def _get(tokenizer, model, ds, cache_dir, builds, ref_id="ref-a", micro_batch_size=5):
    def build():
        builds.append(1)
        return model

    return ref_cache.load_or_compute(
        {"train": ds}, ref_id=ref_id, build_model=build, collate=partial(collate_indexed_pairs, pad_id=tokenizer.pad_token_id),
        parts=PAIR_PARTS, token_columns=PAIR_TOKENS, micro_batch_size=micro_batch_size, cache_dir=str(cache_dir))


def test_cached_values_equal_a_direct_unpadded_computation(builtin_tokenizer, model, tmp_path):
    from align.models.logprobs import sequence_logprobs

    ds = _pairs(builtin_tokenizer, rows=11)  # 11 rows in batches of 5: the last batch is padded with invalid rows
    cols, info = _get(builtin_tokenizer, model, ds, tmp_path, [])
    cols = cols["train"]
    assert info["train"]["computed"] and os.path.exists(info["train"]["path"])
    for i in range(len(ds)):
        row = ds[i]
        for part in PAIR_PARTS:
            ids = torch.tensor([row["prompt_ids"] + row[f"{part}_ids"]])
            mask = torch.tensor([[0] * len(row["prompt_ids"]) + [1] * len(row[f"{part}_ids"])])
            with torch.no_grad():
                lp = sequence_logprobs(model, ids, torch.ones_like(ids), mask)
            torch.testing.assert_close(cols[f"{part}/sum"][i], lp.sum[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(cols[f"{part}/mean"][i], lp.mean[0], rtol=1e-5, atol=1e-6)
            assert cols[f"{part}/tokens"][i].item() == len(row[f"{part}_ids"])


def test_second_call_hits_the_cache_without_building_the_reference(builtin_tokenizer, model, tmp_path):
    ds, builds = _pairs(builtin_tokenizer, rows=8), []
    first, info = _get(builtin_tokenizer, model, ds, tmp_path, builds)
    mtime = os.stat(info["train"]["path"]).st_mtime_ns
    again, info2 = _get(builtin_tokenizer, model, ds, tmp_path, builds, micro_batch_size=3)
    assert builds == [1], "the reference must be built once, on the miss only"
    assert not info2["train"]["computed"] and info2["train"]["key"] == info["train"]["key"]
    assert os.stat(info["train"]["path"]).st_mtime_ns == mtime
    for k in first["train"]:
        torch.testing.assert_close(first["train"][k], again["train"][k], rtol=0, atol=0)


def test_key_changes_with_the_data_the_tokenization_and_the_reference(builtin_tokenizer, tmp_path):
    base = _pairs(builtin_tokenizer, rows=8)
    digest = ref_cache.dataset_digest(base, PAIR_TOKENS)
    assert ref_cache.dataset_digest(_pairs(builtin_tokenizer, rows=8), PAIR_TOKENS) == digest
    assert ref_cache.dataset_digest(_pairs(builtin_tokenizer, rows=9), PAIR_TOKENS) != digest
    assert ref_cache.dataset_digest(_pairs(builtin_tokenizer, rows=8, max_length=40), PAIR_TOKENS) != digest
    assert ref_cache.dataset_digest(base.select([1, 0, *range(2, 8)]), PAIR_TOKENS) != digest  # rows are by index

    a = ref_cache.reference_id(ModelConfig(name_or_path="builtin:tiny-1m"), seed=0)
    assert a == ref_cache.reference_id(ModelConfig(name_or_path="builtin:tiny-1m"), seed=0)
    assert a != ref_cache.reference_id(ModelConfig(name_or_path="builtin:tiny-1m"), seed=1)
    assert a != ref_cache.reference_id(ModelConfig(name_or_path="builtin:tiny-1m"), seed=0, precision="bf16")
    model_dir = tmp_path / "ref"
    model_dir.mkdir()
    (model_dir / "model.safetensors").write_bytes(b"weights-1")
    first = ref_cache.reference_id(ModelConfig(name_or_path=str(model_dir)), seed=0)
    (model_dir / "model.safetensors").write_bytes(b"weights-2")  # same size, new content
    assert ref_cache.reference_id(ModelConfig(name_or_path=str(model_dir)), seed=0) != first
    assert ref_cache.cache_key(digest, a, PAIR_PARTS) != ref_cache.cache_key(digest, "other", PAIR_PARTS)


def test_a_different_reference_misses(builtin_tokenizer, model, tmp_path):
    ds, builds = _pairs(builtin_tokenizer, rows=6), []
    _get(builtin_tokenizer, model, ds, tmp_path, builds, ref_id="ref-a")
    _, info = _get(builtin_tokenizer, model, ds, tmp_path, builds, ref_id="ref-b")
    assert builds == [1, 1] and info["train"]["computed"]
