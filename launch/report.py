"""The comparison report of a pipeline: evaluation of every policy, then a table (Markdown, CSV,
JSON), plots (reward against KL, training curves), one self-contained HTML page, and the same
table and plots in wandb.

report.json schema (one entry per method, see README "Report"):
    {"pipeline": str, "baseline": str, "judge": "gold" | "rm",
     "settings": {"num_prompts", "sampling", "seed"},
     "methods": [{"method", "gold", "gold_ci", "rm", "rm_ci", "kl", "kl_ci", "win_rate",
                  "win_rate_ci", "win_rate_judge", "length", "length_ci", "eos_rate",
                  "distinct_1", "distinct_2", "cost_wall_time_s", "cost_train_tokens"}]}
Missing measures (no gold scorer, no reward model) are left out of an entry.
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import hashlib
import html
import json
import math
import os
from typing import Any, Dict, List

from align.run import input_identity, read_json, write_json
from align.tracking import Tracker, read_metrics

COLUMNS = [("method", "method"), ("gold", "gold score"), ("rm", "RM score"), ("kl", "KL to ref"),
           ("win_rate", "win rate vs baseline"), ("length", "length"), ("distinct_2", "distinct-2"),
           ("cost_wall_time_s", "train time (s)"), ("cost_train_tokens", "train tokens")]


def _methods(pipe) -> List[tuple]:
    return [(spec.method, name) for name, spec in pipe.stages.items() if spec.method]


def evaluate_policies(pipe, reference: str, rm_dir, jobs: List[tuple]) -> List[Dict[str, Any]]:
    """Evaluates each (name, cache file, model dir) of `jobs` against `reference`, with a result
    cached per policy and settings (a cache hit starts nothing)."""
    # heavy (ray; torch and datasets): only when a policy is evaluated
    from align.engine.ray_group import ActorGroup, start_ray
    from align.evaluation import EvalWorker

    ev = pipe.evaluation
    settings = json.dumps([dataclasses.asdict(ev), input_identity(reference), rm_dir and input_identity(rm_dir)],
                          sort_keys=True, default=str)
    results, group = [], None
    try:
        for name, path, model_dir in jobs:
            key = hashlib.sha256((settings + input_identity(model_dir)).encode()).hexdigest()[:16]
            cached = read_json(path)
            if cached is None or cached.get("key") != key:
                if group is None:
                    start_ray(pipe.ray)
                    group = ActorGroup("evaluate", dataclasses.replace(pipe.ray, num_actors=1))
                    group.setup(EvalWorker, ev, reference, rm_dir, ev.seed)
                cached = dict(group.call("evaluate", name, model_dir)[0], key=key)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                write_json(path, cached)
            results.append(cached)
    finally:
        if group is not None:
            group.shutdown()
    return results


def evaluate_and_report(pipe, models: Dict[str, str], summaries: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    from align.evaluation import summarize  # heavy (torch, datasets): only when the pipeline evaluates

    ev = pipe.evaluation
    out_dir = os.path.join(pipe.run_root, "report")
    cache_dir = os.path.join(pipe.run_root, "evaluation")
    os.makedirs(cache_dir, exist_ok=True)
    reference = models[ev.baseline]
    rm_dir = models.get(ev.reward_model) if ev.reward_model else None
    results = evaluate_policies(pipe, reference, rm_dir, [(method, os.path.join(cache_dir, f"{method}.json"), models[stage])
                                                          for method, stage in _methods(pipe)])
    costs = {method: {"wall_time_s": summaries[stage].get("wall_time_s", 0.0),
                      "train_tokens": summaries[stage].get("train_tokens", 0.0)}
             for method, stage in _methods(pipe)}
    baseline_method = pipe.stages[ev.baseline].method or ev.baseline
    rows = summarize(results, baseline_method, costs, ev.bootstrap_samples, ev.seed)
    report = {"pipeline": pipe.name, "baseline": baseline_method,
              "judge": "gold" if any("gold" in r for r in rows) else "rm",
              "settings": {"num_prompts": ev.num_prompts, "sampling": dataclasses.asdict(ev.sampling), "seed": ev.seed},
              "methods": rows}
    paths = write_report(report, results, pipe, summaries, out_dir)
    _to_wandb(pipe, report, paths)
    return {"report": report, **paths}


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def _fmt(row: Dict[str, Any], key: str) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    ci = row.get(f"{key}_ci")
    text = f"{value:.3f}" if abs(value) < 1000 else f"{value:.0f}"
    return f"{text} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else text


def markdown_table(rows: List[Dict[str, Any]]) -> str:
    keys = [k for k, _ in COLUMNS if any(k in r for r in rows)]
    names = dict(COLUMNS)
    lines = ["| " + " | ".join(names[k] for k in keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(r, k) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def write_report(report: Dict[str, Any], results: List[Dict[str, Any]], pipe, summaries, out_dir: str) -> Dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    rows = report["methods"]
    paths = {"report_json": os.path.join(out_dir, "report.json"), "report_md": os.path.join(out_dir, "report.md"),
             "report_csv": os.path.join(out_dir, "report.csv"), "report_html": os.path.join(out_dir, "report.html"),
             "plot_reward_kl": os.path.join(out_dir, "reward_vs_kl.png"),
             "plot_training": os.path.join(out_dir, "training_curves.png")}
    write_json(paths["report_json"], report)
    table = markdown_table(rows)
    with open(paths["report_md"], "w") as fh:
        fh.write(f"# Pipeline {report['pipeline']}\n\nBaseline: {report['baseline']}; win rate judged by "
                 f"{report['judge']}; {report['settings']['num_prompts']} held-out prompts; 95% bootstrap CIs.\n\n"
                 f"{table}\n")
    keys = sorted({k for r in rows for k in r})
    with open(paths["report_csv"], "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()} for r in rows)
    plot_reward_vs_kl(rows, report["judge"], paths["plot_reward_kl"])
    plot_training_curves(pipe, summaries, paths["plot_training"])
    samples = {r["method"]: r["texts"][:3] for r in results}
    write_html(report, table, samples, [paths["plot_reward_kl"], paths["plot_training"]], paths["report_html"])
    return paths


def plot_reward_vs_kl(rows: List[Dict[str, Any]], judge: str, path: str) -> None:
    """Reward against KL to the reference, one point per method (the DPO paper's figure 2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for r in rows:
        if judge not in r or "kl" not in r:
            continue
        yerr = [[r[judge] - r[f"{judge}_ci"][0]], [r[f"{judge}_ci"][1] - r[judge]]]
        xerr = [[r["kl"] - r["kl_ci"][0]], [r["kl_ci"][1] - r["kl"]]]
        ax.errorbar(r["kl"], r[judge], xerr=xerr, yerr=yerr, fmt="o", capsize=3, label=r["method"])
    ax.set_xlabel("KL(policy || reference), per sequence")
    ax.set_ylabel(f"{'gold' if judge == 'gold' else 'reward-model'} score")
    ax.set_title("Reward against KL")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_training_curves(pipe, summaries: Dict[str, Dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in pipe.stages if n in summaries]
    cols = max(1, min(3, len(names)))
    rows_n = int(math.ceil(len(names) / cols)) or 1
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.2 * rows_n), squeeze=False)
    for ax, name in zip(axes.flat, names):
        metrics = read_metrics(os.path.join(pipe.run_root, name))
        for key in ("loss", "eval/loss", "objective/scores", "objective/kl"):
            points = [(m["step"], m[key]) for m in metrics if isinstance(m.get(key), (int, float))]
            if len(points) > 1:
                ax.plot(*zip(*points), label=key)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_html(report: Dict[str, Any], table_md: str, samples: Dict[str, List[str]], images: List[str], path: str,
               extra_md: str = "") -> None:
    """One page with the table, the plots (embedded as base64), `extra_md` (shown as
    preformatted text) and example responses."""
    head = [r.strip("|").split("|") for r in table_md.splitlines()]
    cells = lambda row, tag: "".join(f"<{tag}>{html.escape(c.strip())}</{tag}>" for c in row)  # noqa: E731
    table = f"<table><tr>{cells(head[0], 'th')}</tr>" + "".join(f"<tr>{cells(r, 'td')}</tr>" for r in head[2:]) + "</table>"
    figs = "".join(
        f'<img alt="{os.path.basename(p)}" src="data:image/png;base64,{base64.b64encode(open(p, "rb").read()).decode()}">'
        for p in images if os.path.exists(p))
    examples = "".join(f"<h3>{html.escape(m)}</h3><ul>" + "".join(f"<li>{html.escape(t)}</li>" for t in texts) + "</ul>"
                       for m, texts in samples.items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(report['pipeline'])} report</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}img{{max-width:100%;margin:1em 0}}</style></head>
<body><h1>Pipeline {html.escape(report['pipeline'])}</h1>
<p>Baseline {html.escape(report['baseline'])}; win rate judged by {report['judge']};
{report['settings']['num_prompts']} held-out prompts, same sampling settings and seed for every method; 95% bootstrap CIs.</p>
{table}{figs}{f"<pre>{html.escape(extra_md)}</pre>" if extra_md else ""}<h2>Example responses</h2>{examples}</body></html>"""
    with open(path, "w") as fh:
        fh.write(page)


def _to_wandb(pipe, report: Dict[str, Any], paths: Dict[str, str]) -> None:
    tracker = Tracker(pipe.tracking, os.path.dirname(paths["report_json"]), name=f"{pipe.name}-report",
                      config={"pipeline": pipe.name}, group=pipe.name, job_type="report")
    keys = sorted({k for r in report["methods"] for k in r if not k.endswith("_ci")})
    tracker.log_table("comparison", keys, [[r.get(k) for k in keys] for r in report["methods"]])
    tracker.log_image("reward_vs_kl", paths["plot_reward_kl"])
    tracker.log_image("training_curves", paths["plot_training"])
    tracker.finish()


def print_summary(result: Dict[str, Any]) -> None:
    """The final terminal table; the report's paths are the last lines."""
    if "report" in result:
        print()
        rows = result["report"]["methods"]
        print(markdown_table([dict(r, method=f"{r['method']} {r['setting']} s{r['seed']}") if "setting" in r else r
                              for r in rows]))
        for line in result.get("summary_lines", []):
            print(line)
    for key, error in (result.get("failed") or {}).items():
        print(f"FAILED {key}: {error}")
    print(f"\npipeline finished in {result.get('wall_time_s', 0):.0f} s")
    if "report_html" in result:
        print(f"report (HTML): {os.path.abspath(result['report_html'])}")
        print(f"report (JSON): {os.path.abspath(result['report_json'])}")
