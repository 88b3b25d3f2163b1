"""Typed configs: defaults < YAML < overrides, and errors that name the file and the key."""

from dataclasses import dataclass

import pytest

from align.config import ConfigError, SourceConfig, StageConfig, load_config, save_config


@dataclass
class DemoStage(StageConfig):
    beta: float = 0.1


def write(tmp_path, text, name="stage.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_layers_merge_in_order(tmp_path):
    path = write(tmp_path, "beta: 0.2\noptim:\n  lr: 0.001\n  warmup_steps: 5\nseed: 3\n")
    cfg = load_config(DemoStage, path, ["optim.lr=0.5", "deepspeed.zero_stage=2"])
    assert cfg.beta == 0.2  # YAML over default 0.1
    assert cfg.optim.lr == 0.5  # override over YAML 0.001
    assert cfg.optim.warmup_steps == 5  # YAML only
    assert cfg.seed == 3
    assert cfg.deepspeed.zero_stage == 2  # override only
    assert cfg.optim.weight_decay == 0.0  # default untouched
    assert cfg.model.name_or_path == "builtin:tiny-1m"
    assert isinstance(cfg, DemoStage)


def test_defaults_only():
    cfg = load_config(DemoStage)
    assert cfg == DemoStage()
    assert cfg.beta == 0.1 and cfg.optim.betas == [0.9, 0.999]


def test_nested_sources_from_yaml(tmp_path):
    path = write(
        tmp_path,
        "data:\n"
        "  train:\n"
        "    - path: a.jsonl\n"
        "      weight: 2\n"
        "      columns: {prompt: question}\n"
        "    - path: builtin:sft\n"
        "      max_rows: 10\n",
    )
    cfg = load_config(DemoStage, path)
    assert cfg.data.train == [
        SourceConfig(path="a.jsonl", weight=2.0, columns={"prompt": "question"}),
        SourceConfig(path="builtin:sft", max_rows=10),
    ]
    assert all(isinstance(s, SourceConfig) for s in cfg.data.train)
    assert cfg.data.eval == []


def test_unknown_key_in_yaml_names_file_and_key(tmp_path):
    path = write(tmp_path, "optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(DemoStage, path)
    assert path in str(err.value)
    assert "optim.lrr" in str(err.value)


def test_unknown_key_in_override_names_command_line(tmp_path):
    path = write(tmp_path, "beta: 0.2\n")
    with pytest.raises(ConfigError) as err:
        load_config(DemoStage, path, ["optim.lrr=3"])
    assert "command line" in str(err.value)
    assert "optim.lrr" in str(err.value)
    assert path not in str(err.value)


def test_wrong_type_names_key_and_file(tmp_path):
    path = write(tmp_path, "optim:\n  lr: fast\n")
    with pytest.raises(ConfigError) as err:
        load_config(DemoStage, path)
    assert path in str(err.value)
    assert "optim.lr" in str(err.value)


def test_invalid_choice_from_override_names_key_and_command_line(tmp_path):
    path = write(tmp_path, "beta: 0.2\n")
    with pytest.raises(ConfigError) as err:
        load_config(DemoStage, path, ["deepspeed.zero_stage=5"])
    assert "deepspeed.zero_stage" in str(err.value)
    assert "command line" in str(err.value)


def test_invalid_choice_in_yaml_names_key_and_file(tmp_path):
    path = write(tmp_path, "deepspeed:\n  zero_stage: 5\n")
    with pytest.raises(ConfigError) as err:
        load_config(DemoStage, path, ["beta=0.3"])
    assert "deepspeed.zero_stage" in str(err.value)
    assert path in str(err.value)


def test_override_can_make_yaml_valid(tmp_path):
    # Checks run on the merged config: offload_params needs ZeRO-3, given on the command line.
    path = write(tmp_path, "deepspeed:\n  offload_params: true\n")
    cfg = load_config(DemoStage, path, ["deepspeed.zero_stage=3"])
    assert cfg.deepspeed.offload_params is True and cfg.deepspeed.zero_stage == 3


def test_malformed_override(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(DemoStage, None, ["beta"])
    assert "command line" in str(err.value)
    assert "key=value" in str(err.value)
    assert "'beta'" in str(err.value)


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError) as err:
        load_config(DemoStage, path)
    assert path in str(err.value)
    assert "not found" in str(err.value)


def test_save_then_load_round_trips(tmp_path):
    cfg = load_config(
        DemoStage,
        write(tmp_path, "data:\n  train:\n    - path: a.jsonl\n      weight: 0.5\n"),
        ["beta=0.25", "optim.betas=[0.8,0.95]", "tracking.tags=[x,y]", "model.tokenizer=builtin:synthetic"],
    )
    out = tmp_path / "run" / "config.yaml"
    save_config(cfg, str(out))
    again = load_config(DemoStage, str(out))
    assert again == cfg
    assert again.beta == 0.25 and again.optim.betas == [0.8, 0.95]
    assert again.data.train[0].weight == 0.5
    assert not (tmp_path / "run" / "config.yaml.tmp").exists()
