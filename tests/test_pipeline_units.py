"""Pure pieces of the pipeline and the report: dependency order, config errors, statistics."""

import pytest

from align.config import ConfigError, load_config
from align.evaluation import bootstrap_ci, distinct_n, summarize, win_rates
from launch.pipeline import PipelineConfig, StageSpec, _flatten, order
from launch.report import markdown_table


def test_order_follows_inputs():
    stages = {"ppo": StageSpec(stage="ppo", inputs={"model.name_or_path": "sft", "reward_model": "rm"}),
              "rm": StageSpec(stage="reward_model", inputs={"model.name_or_path": "sft"}),
              "sft": StageSpec(stage="sft")}
    names = order(stages)
    assert names.index("sft") < names.index("rm") < names.index("ppo")


def test_order_rejects_unknown_and_cyclic_inputs():
    with pytest.raises(ConfigError, match="no stage named 'sft'"):
        order({"dpo": StageSpec(stage="dpo", inputs={"model.name_or_path": "sft"})})
    with pytest.raises(ConfigError, match="cycle"):
        order({"a": StageSpec(inputs={"x": "b"}), "b": StageSpec(inputs={"x": "a"})})


def test_pipeline_config_rejects_unknown_keys(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("stages:\n  sft: {stage: sft, overides: {}}\n")
    with pytest.raises(ConfigError, match=r"p.yaml.*overides"):
        load_config(PipelineConfig, str(path))


def test_flatten_nested_overrides():
    assert _flatten("", {"optim": {"lr": 0.001}, "data": {"train": [{"path": "x"}]}, "reference": None}) == [
        "optim.lr=0.001", 'data.train=[{"path": "x"}]', "reference=null"]


def test_bootstrap_ci_of_constant_and_spread():
    assert bootstrap_ci([2.0] * 10) == (2.0, 2.0)
    lo, hi = bootstrap_ci([0.0, 1.0] * 50, samples=2000, seed=1)
    # mean 0.5, standard error sqrt(0.25 / 100) = 0.05, so the 95% interval is about 0.5 +- 0.098
    assert 0.38 < lo < 0.45 and 0.55 < hi < 0.62


def test_win_rates_count_ties_as_half():
    assert win_rates([1.0, 0.0, 0.5], [0.0, 1.0, 0.5]) == [1.0, 0.0, 0.5]


def test_distinct_n_by_hand():
    # unigrams: a b a c -> 3 distinct of 4; bigrams: (a b) (b a) (a c) -> 3 of 3
    assert distinct_n(["a b", "a c"], 1) == 0.75
    assert distinct_n(["a b a c"], 2) == 1.0
    assert distinct_n([""], 2) == 0.0


def test_summarize_rows_and_table():
    results = [
        {"method": "sft", "texts": ["x y"], "kl": [0.0, 0.0], "length": [3, 5], "eos": [True, True], "rm": [],
         "gold": [0.0, -1.0]},
        {"method": "dpo", "texts": ["x z"], "kl": [2.0, 4.0], "length": [4, 4], "eos": [True, False], "rm": [],
         "gold": [1.0, -1.0]},
    ]
    rows = summarize(results, "sft", {"dpo": {"wall_time_s": 10.0}}, samples=200)
    sft, dpo = rows
    assert sft["gold"] == -0.5 and dpo["gold"] == 0.0 and dpo["kl"] == 3.0
    assert "win_rate" not in sft
    assert dpo["win_rate"] == 0.75 and dpo["win_rate_judge"] == "gold"  # one win, one tie
    assert dpo["eos_rate"] == 0.5 and dpo["cost_wall_time_s"] == 10.0
    table = markdown_table(rows)
    assert table.splitlines()[0].startswith("| method | gold score")
    assert "| dpo | 0.000 [" in table


@pytest.mark.parametrize("path", sorted(__import__("glob").glob("configs/pipeline/*.yaml")))
def test_shipped_pipelines_resolve_every_stage(path):
    """Every stage of every shipped pipeline (the real-model one too) resolves to a valid config,
    with its inputs wired to the upstream stage's exported model, or to a file it writes
    (`label/pairs` -> data.train = [{path: <run_dir>/data/pairs.jsonl}])."""
    from launch.pipeline import input_paths, predicted_upstream, stage_config

    pipe = load_config(PipelineConfig, path)
    names = order(pipe.stages)
    upstream = {n: predicted_upstream(pipe, n, f"/models/{n}") for n in names}
    for name in names:
        paths = input_paths(name, pipe.stages[name], upstream)
        cfg = stage_config(pipe, name, paths)
        assert cfg.run_dir.endswith(name) and cfg.tracking.group == pipe.name
        for key, value in pipe.stages[name].inputs.items():
            obj = cfg
            for part in key.split("."):
                obj = getattr(obj, part)
            stage, _, out = value.partition("/")
            if out:
                assert [s.path for s in obj] == [f"/models/{stage}/data/{out}.jsonl"], (name, key)
            else:
                assert obj == f"/models/{stage}/model", (name, key)
    assert pipe.evaluation.baseline in names


def test_inputs_name_an_upstream_model_or_one_of_its_files():
    from launch.pipeline import input_paths, predicted_upstream

    spec = StageSpec(stage="dpo", inputs={"model.name_or_path": "label", "data.train": "label/pairs"})
    assert order({"dpo": spec, "label": StageSpec(stage="label")}) == ["label", "dpo"]
    upstream = {"label": ("builtin:tiny-1m", {"pairs": "/r/label/data/pairs.jsonl"})}
    assert input_paths("dpo", spec, upstream) == {"label": "builtin:tiny-1m", "label/pairs": "/r/label/data/pairs.jsonl"}
    # before any stage runs, a misspelt output is one line naming the key
    pipe = PipelineConfig(stages={"label": StageSpec(stage="label"), "dpo": spec})
    assert predicted_upstream(pipe, "label", "/r/label") == ("/r/label/model", {
        name: f"/r/label/data/{name}.jsonl" for name in ("pairs", "binary", "rankings", "samples")})
    bad = StageSpec(stage="dpo", inputs={"data.train": "label/pairz"})
    with pytest.raises(ConfigError, match=r"stages.dpo.inputs.data.train: stage 'label' writes no output 'pairz'"):
        input_paths("dpo", bad, {"label": predicted_upstream(pipe, "label", "/r/label")})


def test_label_config_errors_name_the_key():
    from reward_model.label import LabelConfig

    with pytest.raises(ConfigError, match="samples_per_prompt: needs at least 2"):
        load_config(LabelConfig, "configs/label/default.yaml", ["samples_per_prompt=1"])
    with pytest.raises(ConfigError, match="reward_model: reward.fns has a 'reward_model' term"):
        load_config(LabelConfig, "configs/label/default.yaml", ["reward.fns=[{fn: reward_model}]"])
    with pytest.raises(ConfigError, match="data.eval: the label stage samples data.train's prompts only"):
        load_config(LabelConfig, "configs/label/default.yaml", ["data.eval_fraction=0.1"])
