"""The main job: a pipeline of stages, then a head-to-head evaluation and report.

    align-pipeline --config configs/pipeline/default.yaml [--from STAGE] [--only STAGE] [key=value ...]

A pipeline config names its stages, each with its own config (a file, plus overrides), the
stages it starts from (`inputs`: a config key set to an upstream stage's exported model, or to a
file it wrote, `label/pairs`), and
settings shared by every stage (`shared`: model, data, seed, tracking, ray). Stages run in
dependency order, each in `<run_root>/<stage>`; a finished stage whose config, data and inputs
hash the same is reused. Then every policy is evaluated on the same prompts (align.evaluation)
and the report is written (launch.report).

Command-line overrides address a stage by name (`dpo.loss.beta=0.2`), the shared settings
(`shared.seed=1`) or the pipeline itself (`evaluation.num_prompts=64`).

Sweeps and seeds: a stage entry's `sweep` (config key -> list of values, expanded as their
product) and the pipeline's `seeds` turn the entry into members, one stage run per (setting,
seed) in `<run_root>/<stage>/<setting>-s<seed>/` (see `expand` for which stages are seeded and
which upstream run a member takes). In such a pipeline a member that fails is recorded and
the others go on; the report marks it (launch.sweep_report).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import itertools
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from omegaconf import ListConfig, OmegaConf

from align.config import ConfigError, RayConfig, TrackingConfig, load_config
from align.data.prepare import check_data, check_models, prepare_stage
from align.errors import cli_main
from align.evaluation import EvalConfig
from align.precision import apply_precision_policy
from align.run import RunDir, read_json
from launch.cli import STAGES, config_class
from launch.report import evaluate_and_report, print_summary
from launch.sweep_report import evaluate_and_report_sweep

log = logging.getLogger("align.pipeline")


@dataclass
class StageSpec:
    # One of launch.cli.STAGES: sft, reward_model, dpo, kto, ppo, label.
    stage: str = "sft"
    # The stage's YAML; defaults to configs/<stage>/default.yaml.
    config: Optional[str] = None
    # Overrides of that config, as a nested mapping (e.g. {optim: {lr: 1e-4}}).
    overrides: Dict[str, Any] = field(default_factory=dict)
    # Config key -> upstream stage whose exported model it receives (e.g. model.name_or_path: sft),
    # or "<stage>/<output>": a file that stage wrote (e.g. data.train: label/pairs, one of its
    # summary's `outputs`); a list-of-sources key such as data.train then gets [{path: <file>}].
    inputs: Dict[str, str] = field(default_factory=dict)
    # A policy this stage produces is evaluated and reported under this name (None: not a policy).
    method: Optional[str] = None
    # Config key -> list of values (e.g. {loss.beta: [0.05, 0.1, 0.5]}): the stage runs once per
    # combination (the product of the lists), each a point of the method's reward-vs-KL frontier.
    sweep: Dict[str, List[Any]] = field(default_factory=dict)
    # With pipeline `seeds`: run once per seed? null: yes when the stage is swept, reports a
    # method other than the evaluation baseline, or takes a seeded stage's model; else one run
    # (with shared.seed) that every seed's members share.
    seeded: Optional[bool] = None


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
    # Seeds of the seeded stages (each member's `seed`); empty: every stage runs once.
    seeds: List[int] = field(default_factory=list)


@dataclass(frozen=True)
class Member:
    """One stage run of a stage entry: a point of its sweep and a seed (None: not seeded)."""

    name: str
    values: Tuple[Tuple[str, Any], ...] = ()
    setting: Optional[str] = None
    seed: Optional[int] = None

    @property
    def label(self) -> Optional[str]:
        """Its folder under <run_root>/<name>: '<setting>-s<seed>', '<setting>', or None (the stage's own)."""
        if self.seed is None:
            return self.setting
        return f"{self.setting or 'default'}-s{self.seed}"

    @property
    def key(self) -> str:
        """Its name in the pipeline's results: 'dpo' for an unexpanded stage, else 'dpo/beta0.1-s1'."""
        return self.name if self.label is None else f"{self.name}/{self.label}"


def upstreams(spec: StageSpec) -> List[str]:
    """The stages an entry's inputs name: 'sft' -> sft, 'label/pairs' -> label."""
    return [value.partition("/")[0] for value in spec.inputs.values()]


def input_paths(name: str, spec: StageSpec, upstream: Dict[str, Tuple[str, Dict[str, str]]]) -> Dict[str, str]:
    """Each input value of stage `name` -> its path, from upstream stage -> (model dir, outputs)."""
    paths = {}
    for key, value in spec.inputs.items():
        stage, _, out = value.partition("/")
        model, outputs = upstream[stage]
        if out and out not in outputs:
            raise ConfigError(f"stages.{name}.inputs.{key}: stage {stage!r} writes no output {out!r}; "
                              f"its outputs are {sorted(outputs)}")
        paths[value] = outputs[out] if out else model
    return paths


def predicted_upstream(pipe: PipelineConfig, name: str, run_dir: str) -> Tuple[str, Dict[str, str]]:
    """(model dir, outputs) that stage `name` will have in `run_dir`, for the checks before any
    stage starts: its export folder, and the files its module declares (OUTPUTS at output_path,
    e.g. reward_model/label.py's pairs, binary, rankings)."""
    kind = pipe.stages[name].stage
    module = importlib.import_module(STAGES[kind][0]) if kind in STAGES else None
    outputs = {out: module.output_path(run_dir, out) for out in getattr(module, "OUTPUTS", ())}
    return os.path.join(run_dir, "model"), outputs


def _input_override(cls, key: str, value: str, path: str) -> str:
    """`key=path`; a file for a list-of-sources key (data.train) becomes [{path: <file>}]."""
    if "/" in value and isinstance(OmegaConf.select(OmegaConf.structured(cls), key), ListConfig):
        return f"{key}=[{{path: {json.dumps(path)}}}]"
    return f"{key}={path}"


def is_expanded(pipe: PipelineConfig) -> bool:
    return bool(pipe.seeds) or any(spec.sweep for spec in pipe.stages.values())


def _setting_label(values: Tuple[Tuple[str, Any], ...], index: Tuple[int, ...]) -> str:
    """'beta0.1' for {loss.beta: 0.1}; '_'-joined for several keys; a list or mapping value is
    named by its position in the sweep ('train2')."""
    shorts = [key.rsplit(".", 1)[-1] for key, _ in values]
    parts = []
    for (key, value), i in zip(values, index):
        name = key.replace(".", "-") if shorts.count(key.rsplit(".", 1)[-1]) > 1 else key.rsplit(".", 1)[-1]
        text = str(i + 1) if isinstance(value, (list, dict)) else str(value)
        parts.append(name + text.replace("/", "-").replace(" ", ""))
    return "_".join(parts)


def expand(pipe: PipelineConfig) -> Dict[str, List[Member]]:
    """The members of every stage entry, in dependency order.

    Seeding rule: with `seeds`, a stage is seeded (one run per seed) when it is swept, reports a
    method other than the evaluation baseline, or takes a seeded stage's model (`seeded` on the
    entry overrides the first two); an unseeded stage (by default the SFT baseline and the
    reward model) runs once and every seed's members share it. A seeded member takes the same
    seed's run of a seeded upstream. A swept stage cannot feed another stage.
    """
    if len(set(pipe.seeds)) != len(pipe.seeds):
        raise ConfigError(f"seeds: {pipe.seeds} repeats a seed")
    seeded: Dict[str, bool] = {}
    members: Dict[str, List[Member]] = {}
    for name in order(pipe.stages):
        spec = pipe.stages[name]
        for upstream in upstreams(spec):
            if pipe.stages[upstream].sweep:
                raise ConfigError(f"stages.{name}.inputs: {upstream!r} is swept; a swept stage cannot feed another stage")
        seeded_inputs = [u for u in upstreams(spec) if seeded[u]]
        auto = bool(spec.sweep) or (spec.method is not None and name != pipe.evaluation.baseline) or bool(seeded_inputs)
        if spec.seeded is False and seeded_inputs:
            raise ConfigError(f"stages.{name}.seeded: false, but its input {seeded_inputs[0]!r} runs once per seed")
        seeded[name] = bool(pipe.seeds) and (auto if spec.seeded is None else spec.seeded)
        for key, values in spec.sweep.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"stages.{name}.sweep.{key}: needs a non-empty list of values, got {values!r}")
        keys = list(spec.sweep)
        points = []
        for index in itertools.product(*(range(len(spec.sweep[k])) for k in keys)):
            values = tuple((k, spec.sweep[k][i]) for k, i in zip(keys, index))
            points.append((values, _setting_label(values, index) if keys else None))
        seeds = list(pipe.seeds) if seeded[name] else [None]
        members[name] = [Member(name, values, setting, seed) for values, setting in points for seed in seeds]
        labels = [m.label for m in members[name]]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"stages.{name}.sweep: two settings get the same name; use distinct values")
    return members


def upstream_member(members: Dict[str, List[Member]], member: Member, upstream: str) -> Member:
    """The run of `upstream` that `member` takes: the same seed's when it is seeded, else its only run."""
    runs = members[upstream]
    return runs[0] if len(runs) == 1 else next(u for u in runs if u.seed == member.seed)


def _flatten(prefix: str, value: Any) -> List[str]:
    if isinstance(value, dict):
        return [item for k, v in value.items() for item in _flatten(f"{prefix}.{k}" if prefix else k, v)]
    if isinstance(value, list):
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
        for upstream in upstreams(stages[name]):
            visit(upstream, path + (name,))
        visiting.discard(name)
        done.append(name)

    for name in stages:
        visit(name, ())
    return done


def stage_config(pipe: PipelineConfig, name: str, models: Dict[str, str], extra: Sequence[str] = (),
                 member: Optional[Member] = None):
    """The resolved config of stage `name` (or of one `member` of it): shared < stage file <
    stage overrides < the member's sweep values and seed < inputs < command line. `models` maps
    each input value to its path (`input_paths`)."""
    spec = pipe.stages[name]
    if spec.stage not in STAGES:
        raise ConfigError(f"stages.{name}.stage: {spec.stage!r} is not one of {sorted(STAGES)}")
    cls = config_class(spec.stage)
    overrides = _flatten("", spec.overrides)
    run_dir = os.path.join(pipe.run_root, name)
    if member is not None:
        overrides += [item for key, value in member.values for item in _flatten(key, value)]
        overrides += [f"seed={member.seed}"] if member.seed is not None else []
        run_dir = os.path.join(run_dir, member.label) if member.label else run_dir
    overrides += [_input_override(cls, key, value, models[value]) for key, value in spec.inputs.items()]
    overrides += [f"run_dir={run_dir}", f"tracking.group={pipe.name}"]
    base = dict(pipe.shared, tracking={**_as_dict(pipe.tracking), **pipe.shared.get("tracking", {})},
                ray={**_as_dict(pipe.ray), **pipe.shared.get("ray", {})})
    try:
        cfg = load_config(cls, spec.config or STAGES[spec.stage][1], [*overrides, *extra], base=base)
    except ConfigError as err:
        if member is None or member.label is None:
            raise
        raise ConfigError(f"stages.{name} ({member.label}): {err}") from None
    if member is not None and member.label is not None:
        # The wandb run carries its place in the sweep (its config also has the swept keys and seed).
        cfg.tracking.tags = [*cfg.tracking.tags, f"stage={name}", f"setting={member.setting or 'default'}",
                             f"seed={cfg.seed}"]
    return cfg


def _as_dict(obj: Any) -> Dict[str, Any]:
    return dataclasses.asdict(obj)


def run_pipeline(pipe: PipelineConfig, overrides: Sequence[str] = (), start_from: Optional[str] = None,
                 only: Optional[str] = None) -> Dict[str, Any]:
    """Runs the stages, the evaluation and the report; returns the report's paths and rows.

    With sweeps or seeds (`is_expanded`) every member runs; one that fails (its config, its run,
    or an upstream run it needs) is recorded in the result's `failed` and the others go on.
    """
    names = order(pipe.stages)
    for flag, value in (("--from", start_from), ("--only", only)):
        if value is not None and value not in names:
            raise ConfigError(f"{flag}: no stage named {value!r}; stages are {names}")
    per_stage = {n: [o.split(".", 1)[1] for o in overrides if o.startswith(n + ".")] for n in names}
    forced = set(names[names.index(start_from):]) if start_from else set()
    expanded = is_expanded(pipe)
    members = expand(pipe) if expanded else {n: [Member(n)] for n in names}
    started = time.time()
    models: Dict[str, str] = {}
    outputs: Dict[str, Dict[str, str]] = {}  # files a stage wrote (label: pairs, binary, rankings)
    summaries: Dict[str, Dict[str, Any]] = {}
    failed: Dict[str, str] = {}
    info: Dict[str, Dict[str, Any]] = {}
    if expanded:  # every member's config first: a bad value fails that member before any start-up
        for name in names:
            for m in members[name]:
                predicted = {u: predicted_upstream(pipe, u, os.path.join(pipe.run_root, u,
                                                                         upstream_member(members, m, u).label or ""))
                             for u in upstreams(pipe.stages[name])}
                try:
                    stage_config(pipe, name, input_paths(name, pipe.stages[name], predicted), per_stage[name], m)
                except ConfigError as err:
                    _fail(failed, m.key, f"config error: {err}")
    for name in names:
        for m in members[name]:
            if m.key in failed:
                continue
            ups = {u: upstream_member(members, m, u).key for u in upstreams(pipe.stages[name])}
            lost = [k for k in ups.values() if k not in models]
            if lost:
                _fail(failed, m.key, f"not run: upstream {lost[0]} failed")
                continue
            try:
                paths = input_paths(name, pipe.stages[name], {u: (models[k], outputs[k]) for u, k in ups.items()})
                cfg = stage_config(pipe, name, paths, per_stage[name], m if expanded else None)
                info[m.key] = {"name": name, "method": pipe.stages[name].method, "setting": m.setting,
                               "seed": cfg.seed, "seeded": m.seed is not None}
                if only is not None and name != only:
                    done = read_json(RunDir(cfg.run_dir).done)
                    if done is None:
                        raise ConfigError(f"--only {only}: upstream stage {m.key!r} has not finished in {cfg.run_dir}")
                    summaries[m.key], models[m.key], outputs[m.key] = done, done["model_dir"], done.get("outputs", {})
                    continue
                module = importlib.import_module(STAGES[pipe.stages[name].stage][0])
                prepare_stage(cfg)  # its upstream models exist now: check them, tokenize its data
                log.info("stage %s (%s) -> %s", m.key, pipe.stages[name].stage, cfg.run_dir)
                summary = module.run(cfg, reuse=name not in forced, group=pipe.name)
            except Exception as err:  # noqa: BLE001 - in a sweep one member's failure is reported, not fatal
                if not expanded:
                    raise
                _fail(failed, m.key, f"{type(err).__name__}: {err}")
                continue
            summaries[m.key], models[m.key], outputs[m.key] = summary, summary["model_dir"], summary.get("outputs", {})
            # A data stage (label) passes its input model through: name what it made instead.
            made = ", ".join(summary["outputs"].values()) if summary.get("outputs") else summary["model_dir"]
            print(f"[pipeline] {m.key}: {'reused' if summary.get('reused') else 'done'} "
                  f"in {summary.get('wall_time_s', 0):.0f} s -> {made}", flush=True)
    result: Dict[str, Any] = {"stages": summaries, "models": models}
    if expanded:
        result.update(failed=failed, members={m.key: info.get(m.key, {"name": n, "method": pipe.stages[n].method,
                                                                      "setting": m.setting, "seed": m.seed,
                                                                      "seeded": m.seed is not None})
                                              for n in names for m in members[n]})
    if pipe.evaluation.enabled and (only is None or only == names[-1]):
        if expanded:
            result.update(evaluate_and_report_sweep(pipe, models, summaries, result["members"], failed))
        else:
            result.update(evaluate_and_report(pipe, models, summaries))
    result["wall_time_s"] = round(time.time() - started, 1)
    return result


def check_pipeline(pipe: PipelineConfig, overrides: Sequence[str] = (), only: Optional[str] = None) -> None:
    """Before any stage starts: every stage's config resolves, its model paths that no upstream
    stage produces exist, and every row of its data passes the checks (tokenizer-dependent
    checks, such as a prompt's length, run just before the stage, when its tokenizer exists)."""
    names = order(pipe.stages)
    if only is not None and only not in names:
        raise ConfigError(f"--only: no stage named {only!r}; stages are {names}")
    per_stage = {n: [o.split(".", 1)[1] for o in overrides if o.startswith(n + ".")] for n in names}
    predicted = {n: predicted_upstream(pipe, n, os.path.join(pipe.run_root, n)) for n in names}
    for name in names:
        paths = input_paths(name, pipe.stages[name], predicted)
        cfg = stage_config(pipe, name, paths, per_stage[name])
        if only is not None and name != only:
            continue
        apply_precision_policy(cfg)  # bf16 without bf16 hardware: one line, or a config error, now
        check_models(cfg, skip=tuple(pipe.stages[name].inputs))
        check_data(cfg, skip=[path for value, path in paths.items() if "/" in value])  # not written yet


def _fail(failed: Dict[str, str], key: str, message: str) -> None:
    """Records a member's failure: its first line, printed at once and kept for the report."""
    line = (message.strip().splitlines() or [""])[0][:400]
    failed[key] = line
    print(f"[pipeline] {key}: FAILED ({line}); the other runs go on", flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
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
                      in ("name", "run_root", "seeds", "shared", "evaluation", "tracking", "ray")]
    pipe = load_config(PipelineConfig, args.config, pipe_overrides)
    stage_overrides = [o for o in args.overrides if o not in pipe_overrides]
    unknown = [o for o in stage_overrides if o.split(".", 1)[0] not in pipe.stages]
    if unknown:
        raise ConfigError(f"command line: {unknown} name no stage of {sorted(pipe.stages)} and no pipeline key")
    check_pipeline(pipe, stage_overrides, args.only)  # quiet: nothing is printed before a mistake
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    result = run_pipeline(pipe, stage_overrides, args.start_from, args.only)
    print_summary(result)
    return 1 if result.get("failed") else 0


if __name__ == "__main__":
    raise SystemExit(main())
