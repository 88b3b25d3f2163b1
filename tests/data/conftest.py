"""Data-layer test setup: offline, caches in a temporary directory, a tiny tokenizer, and
fixtures that write data files (`write`) and build data configs (`make_cfg`)."""

import json
import os

# Before datasets / huggingface_hub read them at import time: never touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import datasets  # noqa: E402
import pytest  # noqa: E402

from align.config import DataConfig, SourceConfig  # noqa: E402

datasets.disable_progress_bars()

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CORPUS = [
    "The movie was great and the acting was wonderful.",
    "Write a short review of the film.",
    "The plot was boring, the music was loud.",
    "Human: What is the capital of France? Assistant: Paris is the capital of France.",
    "I liked it. I did not like it. It was fine.",
]


@pytest.fixture(autouse=True)
def hf_cache(tmp_path_factory, monkeypatch):
    """datasets caches under a per-session temporary directory (config is read at import)."""
    cache = tmp_path_factory.getbasetemp() / "hf-datasets"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture(scope="session")
def tokenizer():
    """A byte-level BPE tokenizer trained on a few sentences, with pad/bos/eos and a template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>", "<|system|>", "<|user|>", "<|assistant|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", additional_special_tokens=specials[3:])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def write_rows(path, rows):
    """Writes rows as .jsonl, .json (a list), .csv or .parquet, chosen by the suffix."""
    path = str(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if path.endswith(".jsonl"):
        with open(path, "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
    elif path.endswith(".json"):
        with open(path, "w") as fh:
            json.dump(rows, fh)
    else:
        ds = datasets.Dataset.from_list(rows)
        ds.to_csv(path, index=False) if path.endswith(".csv") else ds.to_parquet(path)
    return path


def cfg(paths, on_error="raise", **kw):
    """A DataConfig whose training sources are `paths` (strings or SourceConfigs)."""
    sources = [p if isinstance(p, SourceConfig) else SourceConfig(path=str(p)) for p in paths]
    kw.setdefault("max_length", 64)
    kw.setdefault("max_prompt_length", 32)
    return DataConfig(train=sources, on_error=on_error, **kw)


@pytest.fixture
def write(tmp_path):
    """write(name, rows) -> path of a new file under tmp_path (format from the suffix)."""
    return lambda name, rows: write_rows(tmp_path / name, rows)


@pytest.fixture(scope="session")
def make_cfg():
    return cfg
