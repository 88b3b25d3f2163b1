"""The main job: a pipeline of stages, then a head-to-head evaluation and report.

    align-pipeline --config configs/pipeline/default.yaml [--from STAGE] [--only STAGE] [key=value ...]

A pipeline config names its stages, each with its own config (a file, plus overrides), the
stages it starts from (`inputs`: a config key set to an upstream stage's exported model), and
settings shared by every stage (`shared`: model, data, seed, tracking, ray). Stages run in
dependency order, each in `<run_root>/<stage>`; a finished stage whose config, data and inputs
hash the same is reused. Then every policy is evaluated on the same prompts (align.evaluation)
and the report is written (launch.report).

Command-line overrides address a stage by name (`dpo.loss.beta=0.2`), the shared settings
(`shared.seed=1`) or the pipeline itself (`evaluation.num_prompts=64`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from align.config import ConfigError, RayConfig, TrackingConfig, load_config
from align.evaluation import EvalConfig

log = logging.getLogger("align.pipeline")


@dataclass
class StageSpec:
    # One of launch.cli.STAGES: sft, reward_model, dpo, kto, ppo.
    stage: str = "sft"
    # The stage's YAML; defaults to configs/<stage>/default.yaml.
    config: Optional[str] = None
    # Overrides of that config, as a nested mapping (e.g. {optim: {lr: 1e-4}}).
    overrides: Dict[str, Any] = field(default_factory=dict)
    # Config key -> upstream stage whose exported model it receives (e.g. model.name_or_path: sft).
    inputs: Dict[str, str] = field(default_factory=dict)
    # A policy this stage produces is evaluated and reported under this name (None: not a policy).
    method: Optional[str] = None


@dataclass
class EvaluationSpec(EvalConfig):
    # The policy every method is compared with (win rate) and the KL reference: a stage name.
    baseline: str = "sft"
    # The reward model used for reward-model scores (a stage name), if any.
    reward_model: Optional[str] = None
    enabled: bool = True


@dataclass
class PipelineConfig:
    name: str = "default"
    run_root: str = "runs/default"
    # Merged into every stage's config before its own file and overrides.
    shared: Dict[str, Any] = field(default_factory=dict)
    stages: Dict[str, StageSpec] = field(default_factory=dict)
    evaluation: EvaluationSpec = field(default_factory=EvaluationSpec)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    ray: RayConfig = field(default_factory=RayConfig)


def _flatten(prefix: str, value: Any) -> List[str]:
    if isinstance(value, dict):
        return [item for k, v in value.items() for item in _flatten(f"{prefix}.{k}" if prefix else k, v)]
    if isinstance(value, list):
        import json

        return [f"{prefix}={json.dumps(value)}"]
    return [f"{prefix}={'null' if value is None else value}"]


def order(stages: Dict[str, StageSpec]) -> List[str]:
    """Stage names in dependency order; an unknown or cyclic dependency is a config error."""
    done: List[str] = []
    visiting: set = set()

    def visit(name: str, path: tuple) -> None:
        if name in done:
            return
        if name not in stages:
            raise ConfigError(f"stages.{path[-1]}.inputs: no stage named {name!r}")
        if name in visiting:
            raise ConfigError(f"stages: dependency cycle {' -> '.join(path + (name,))}")
        visiting.add(name)
        for upstream in stages[name].inputs.values():
            visit(upstream, path + (name,))
        visiting.discard(name)
        done.append(name)

    for name in stages:
        visit(name, ())
    return done


def stage_config(pipe: PipelineConfig, name: str, models: Dict[str, str], extra: Sequence[str] = ()):
    """The resolved config of stage `name`: shared < stage file < stage overrides < inputs < command line."""
    from launch.cli import STAGES, config_class

    spec = pipe.stages[name]
    if spec.stage not in STAGES:
        raise ConfigError(f"stages.{name}.stage: {spec.stage!r} is not one of {sorted(STAGES)}")
    cls = config_class(spec.stage)
    overrides = _flatten("", spec.overrides)
    overrides += [f"{key}={models[upstream]}" for key, upstream in spec.inputs.items()]
    overrides += [f"run_dir={os.path.join(pipe.run_root, name)}", f"tracking.group={pipe.name}"]
    base = dict(pipe.shared, tracking={**_as_dict(pipe.tracking), **pipe.shared.get("tracking", {})},
                ray={**_as_dict(pipe.ray), **pipe.shared.get("ray", {})})
    return load_config(cls, spec.config or STAGES[spec.stage][1], [*overrides, *extra], base=base)


def _as_dict(obj: Any) -> Dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(obj)


def run_pipeline(pipe: PipelineConfig, overrides: Sequence[str] = (), start_from: Optional[str] = None,
                 only: Optional[str] = None) -> Dict[str, Any]:
    """Runs the stages, the evaluation and the report; returns the report's paths and rows."""
    import importlib

    from align.data.prepare import prepare_stage
    from launch.cli import STAGES

    names = order(pipe.stages)
    for flag, value in (("--from", start_from), ("--only", only)):
        if value is not None and value not in names:
            raise ConfigError(f"{flag}: no stage named {value!r}; stages are {names}")
    per_stage = {n: [o.split(".", 1)[1] for o in overrides if o.startswith(n + ".")] for n in names}
    forced = set(names[names.index(start_from):]) if start_from else set()
    started = time.time()
    models: Dict[str, str] = {}
    summaries: Dict[str, Dict[str, Any]] = {}
    for name in names:
        cfg = stage_config(pipe, name, models, per_stage[name])
        from align.run import RunDir, read_json

        if only is not None and name != only:
            done = read_json(RunDir(cfg.run_dir).done)
            if done is None:
                raise ConfigError(f"--only {only}: upstream stage {name!r} has not finished in {cfg.run_dir}")
            summaries[name], models[name] = done, done["model_dir"]
            continue
        module = importlib.import_module(STAGES[pipe.stages[name].stage][0])
        prepare_stage(cfg)  # its upstream models exist now: check them, tokenize its data
        log.info("stage %s (%s) -> %s", name, pipe.stages[name].stage, cfg.run_dir)
        summary = module.run(cfg, reuse=name not in forced, group=pipe.name)
        summaries[name], models[name] = summary, summary["model_dir"]
        print(f"[pipeline] {name}: {'reused' if summary.get('reused') else 'done'} "
              f"in {summary.get('wall_time_s', 0):.0f} s -> {summary['model_dir']}", flush=True)
    result: Dict[str, Any] = {"stages": summaries, "models": models}
    if pipe.evaluation.enabled and (only is None or only == names[-1]):
        from launch.report import evaluate_and_report

        result.update(evaluate_and_report(pipe, models, summaries))
    result["wall_time_s"] = round(time.time() - started, 1)
    return result


def check_pipeline(pipe: PipelineConfig, overrides: Sequence[str] = (), only: Optional[str] = None) -> None:
    """Before any stage starts: every stage's config resolves, its model paths that no upstream
    stage produces exist, and every row of its data passes the checks (tokenizer-dependent
    checks, such as a prompt's length, run just before the stage, when its tokenizer exists)."""
    from align.data.prepare import check_data, check_models

    names = order(pipe.stages)
    if only is not None and only not in names:
        raise ConfigError(f"--only: no stage named {only!r}; stages are {names}")
    per_stage = {n: [o.split(".", 1)[1] for o in overrides if o.startswith(n + ".")] for n in names}
    models = {n: os.path.join(pipe.run_root, n, "model") for n in names}  # RunDir(run_dir).model
    for name in names:
        cfg = stage_config(pipe, name, models, per_stage[name])
        if only is not None and name != only:
            continue
        check_models(cfg, skip=tuple(pipe.stages[name].inputs))
        check_data(cfg)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from align.errors import cli_main

    return cli_main(_main, list(sys.argv[1:] if argv is None else argv))


def _main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/pipeline/default.yaml")
    parser.add_argument("--from", dest="start_from", help="rerun this stage and every stage after it")
    parser.add_argument("--only", help="run only this stage (its upstream stages must have finished)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks (also ALIGN_DEBUG=1)")
    parser.add_argument("overrides", nargs="*", help="STAGE.key=value, shared.key=value or pipeline key=value")
    args = parser.parse_args(argv)
    pipe_overrides = [o for o in args.overrides if "=" in o and o.split("=", 1)[0].split(".")[0]
                      in ("name", "run_root", "shared", "evaluation", "tracking", "ray")]
    pipe = load_config(PipelineConfig, args.config, pipe_overrides)
    stage_overrides = [o for o in args.overrides if o not in pipe_overrides]
    unknown = [o for o in stage_overrides if o.split(".", 1)[0] not in pipe.stages]
    if unknown:
        raise ConfigError(f"command line: {unknown} name no stage of {sorted(pipe.stages)} and no pipeline key")
    check_pipeline(pipe, stage_overrides, args.only)  # quiet: nothing is printed before a mistake
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    result = run_pipeline(pipe, stage_overrides, args.start_from, args.only)
    from launch.report import print_summary

    print_summary(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
