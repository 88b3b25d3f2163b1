"""The report of a pipeline with sweeps or seeds: every (method, setting, seed) evaluated on the
same prompts, then frontiers, best score per KL budget, paired differences, the win matrix and
the across-seed spread (align.comparison), written beside the usual table.

report.json (README "Sweeps and frontiers"):
    {"pipeline", "baseline", "judge", "settings": {..., "seeds", "sweeps"},
     "methods": [one entry per (method, setting, seed): the usual fields plus "setting", "seed"],
     "frontier": {method: [{"setting", "kl", "kl_ci", "gold", "gold_ci", "seeds", "gold_seed_std"}]},
     "best_at_budget": [{"budget", "best": {method: {"gold", "setting", "kl"} or null}}],
     "pairwise": [{"a", "b", "a_setting", "b_setting", "judge", "diff", "ci", "text"}],
     "win_matrix": {a: {b: P(a beats b)}}, "seed_std": {method: mean over settings or null},
     "failed": [{"run", "stage", "method", "setting", "seed", "error"}]}
"gold" in frontier points is the judge's score (the reward model's without a gold scorer).
Pairwise comparisons and the win matrix take each method at its best setting (highest mean
score over seeds): the question they answer is "tuned over this sweep, which method is better".
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import statistics
from collections import defaultdict
from typing import Any, Dict, List, Optional

from align.comparison import (best_at_budget, format_difference, frontier_points, kl_budgets, paired_bootstrap,
                              win_matrix)
from align.run import write_json
from align.tracking import Tracker, read_metrics
from launch.report import evaluate_policies, markdown_table, write_html


def _counterpart(members: Dict[str, Dict[str, Any]], stage: str, seed: Any, available) -> Optional[str]:
    """The run of `stage` that goes with a member of seed `seed` (the same seed's when seeded)."""
    runs = [k for k, m in members.items() if m["name"] == stage and k in available]
    seeded = [k for k in runs if members[k].get("seeded")]
    if seeded:
        runs = [k for k in seeded if members[k]["seed"] == seed]
    return runs[0] if runs else None


def evaluate_and_report_sweep(pipe, models: Dict[str, str], summaries: Dict[str, Dict[str, Any]],
                              members: Dict[str, Dict[str, Any]], failed: Dict[str, str]) -> Dict[str, Any]:
    from align.evaluation import summarize  # heavy (torch, datasets): only when the pipeline evaluates

    ev = pipe.evaluation
    out_dir, cache_dir = os.path.join(pipe.run_root, "report"), os.path.join(pipe.run_root, "evaluation")
    policies = [k for k, m in members.items() if m["method"] and k in models]
    # Evaluate per (reference, reward model): one pair unless the baseline or reward model is seeded.
    results: Dict[str, Dict[str, Any]] = {}
    jobs: Dict[tuple, List[tuple]] = defaultdict(list)
    base_of: Dict[str, str] = {}
    for key in policies:
        seed = members[key]["seed"]
        base = _counterpart(members, ev.baseline, seed, models)
        rm = _counterpart(members, ev.reward_model, seed, models) if ev.reward_model else None
        if base is None:
            failed.setdefault(key, "not evaluated: the baseline failed")
            continue
        base_of[key] = base
        jobs[(models[base], models[rm] if rm else None)].append((key, os.path.join(cache_dir, key + ".json"), models[key]))
    for (reference, rm_dir), todo in jobs.items():
        results.update({r["method"]: r for r in evaluate_policies(pipe, reference, rm_dir, todo)})
    judge = "gold" if results and all(r.get("gold") for r in results.values()) else "rm"

    rows = []
    for key in policies:
        if key not in results or base_of.get(key) not in results:
            continue
        info, base = members[key], base_of[key]
        cost = {key: {"wall_time_s": summaries[key].get("wall_time_s", 0.0),
                      "train_tokens": summaries[key].get("train_tokens", 0.0)}}
        pair = [results[base]] if key == base else [results[base], results[key]]
        row = summarize(pair, base, cost, ev.bootstrap_samples, ev.seed)[-1]
        row.update(method=info["method"], setting=info["setting"] or "default", seed=info["seed"])
        rows.append(row)

    # Per method and setting, the [seed][prompt] tables of the judge's score and of KL.
    tables: Dict[str, Dict[str, Dict[str, list]]] = defaultdict(lambda: defaultdict(lambda: {"kl": [], judge: []}))
    for key in sorted((k for k in policies if k in results), key=lambda k: (members[k]["seed"] or 0)):
        info = members[key]
        cell = tables[info["method"]][info["setting"] or "default"]
        cell["kl"].append(results[key]["kl"])
        cell[judge].append(results[key][judge] or [])
    frontier = {m: frontier_points({s: {"kl": t["kl"], "gold": t[judge]} for s, t in settings.items()},
                                   ev.bootstrap_samples, ev.seed) for m, settings in tables.items()}
    baseline_method = pipe.stages[ev.baseline].method or ev.baseline
    budgets = kl_budgets([p["kl"] for m, pts in frontier.items() if m != baseline_method for p in pts])
    best = {m: max(pts, key=lambda p: p["gold"])["setting"] for m, pts in frontier.items()}
    best_tables = {m: tables[m][best[m]][judge] for m in frontier}
    names = [m for m in frontier if m != baseline_method] + [m for m in frontier if m == baseline_method]
    pairwise = []  # every two methods, the baseline last: "dpo - sft" reads as dpo's gain
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            diff, ci = paired_bootstrap(best_tables[a], best_tables[b], ev.bootstrap_samples, ev.seed)
            pairwise.append({"a": a, "b": b, "a_setting": best[a], "b_setting": best[b], "judge": judge,
                             "diff": diff, "ci": list(ci), "text": format_difference(a, b, diff, ci)})
    seed_std = {}
    for m, pts in frontier.items():
        stds = [p["gold_seed_std"] for p in pts if p["gold_seed_std"] is not None]
        seed_std[m] = statistics.mean(stds) if stds else None
    report = {
        "pipeline": pipe.name, "baseline": baseline_method, "judge": judge,
        "settings": {"num_prompts": ev.num_prompts, "sampling": dataclasses.asdict(ev.sampling), "seed": ev.seed,
                     "seeds": list(pipe.seeds), "sweeps": {n: dict(s.sweep) for n, s in pipe.stages.items() if s.sweep}},
        "methods": rows, "frontier": frontier, "best_at_budget": best_at_budget(frontier, budgets),
        "pairwise": pairwise, "win_matrix": win_matrix(best_tables), "seed_std": seed_std,
        "failed": [{"run": k, "stage": members.get(k, {}).get("name"), "method": members.get(k, {}).get("method"),
                    "setting": members.get(k, {}).get("setting"), "seed": members.get(k, {}).get("seed"), "error": e}
                   for k, e in failed.items()],
    }
    paths = write_sweep_report(report, results, pipe, summaries, members, out_dir)
    _to_wandb(pipe, report, paths)
    return {"report": report, "summary_lines": [p["text"] for p in pairwise], **paths}


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def _ci(value: Optional[float], ci) -> str:
    return "-" if value is None else f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def sections_markdown(report: Dict[str, Any]) -> str:
    """Frontier, best per KL budget, paired differences, win matrix, seed spread and failures."""
    judge = report["judge"]
    out = [f"## Reward-vs-KL frontier ({judge}; mean over seeds, 95% CI over prompts and seeds)", "",
           f"| method | setting | seeds | KL | {judge} | across-seed std |", "|---|---|---|---|---|---|"]
    for m, pts in report["frontier"].items():
        out += [f"| {m} | {p['setting']} | {p['seeds']} | {_ci(p['kl'], p['kl_ci'])} | {_ci(p['gold'], p['gold_ci'])} | "
                f"{'-' if p['gold_seed_std'] is None else format(p['gold_seed_std'], '.3f')} |" for p in pts]
    methods = list(report["frontier"])
    out += ["", f"## Best {judge} within a KL budget (budgets: quartiles of the points' KL)", "",
            "| KL budget | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for row in report["best_at_budget"]:
        cells = ["-" if row["best"][m] is None else f"{row['best'][m]['gold']:.3f} ({row['best'][m]['setting']})"
                 for m in methods]
        out.append(f"| {row['budget']:.3f} | " + " | ".join(cells) + " |")
    out += ["", f"## Paired differences in {judge} (each method at its best setting; same prompts; 95% CI)", ""]
    out += [f"- {p['text']}  ({p['a_setting']} vs {p['b_setting']})" for p in report["pairwise"]]
    out += ["", "## Win rate (row beats column on the same prompt; ties count half)", "",
            "| | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    out += [f"| {a} | " + " | ".join("-" if a == b else f"{report['win_matrix'][a][b]:.3f}" for b in methods) + " |"
            for a in methods]
    out += ["", f"## Across-seed standard deviation of {judge} (mean over settings)", ""]
    out += [f"- {m}: {'-' if v is None else format(v, '.3f')}" for m, v in report["seed_std"].items()]
    if report["failed"]:
        out += ["", "## FAILED runs", ""] + [f"- {f['run']}: {f['error']}" for f in report["failed"]]
    return "\n".join(out)


def write_sweep_report(report, results, pipe, summaries, members, out_dir: str) -> Dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = {"report_json": os.path.join(out_dir, "report.json"), "report_md": os.path.join(out_dir, "report.md"),
             "report_csv": os.path.join(out_dir, "report.csv"), "report_html": os.path.join(out_dir, "report.html"),
             "plot_frontier": os.path.join(out_dir, "frontier.png"),
             "plot_training": os.path.join(out_dir, "training_curves.png")}
    write_json(paths["report_json"], report)
    shown = [dict(r, method=f"{r['method']} {r['setting']} s{r['seed']}") for r in report["methods"]]
    shown += [{"method": f"{f['run']} FAILED"} for f in report["failed"]]
    table, sections = markdown_table(shown), sections_markdown(report)
    with open(paths["report_md"], "w") as fh:
        fh.write(f"# Pipeline {report['pipeline']}\n\nBaseline: {report['baseline']}; judged by {report['judge']}; "
                 f"{report['settings']['num_prompts']} held-out prompts; seeds {report['settings']['seeds']}; "
                 f"95% bootstrap CIs.\n\n{table}\n\n{sections}\n")
    keys = sorted({k for r in report["methods"] for k in r})
    with open(paths["report_csv"], "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()} for r in report["methods"])
    plot_frontier(report, paths["plot_frontier"])
    plot_member_curves(summaries, members, paths["plot_training"])
    samples = {k: r["texts"][:2] for k, r in results.items()}
    write_html(report, table, samples, [paths["plot_frontier"], paths["plot_training"]], paths["report_html"], sections)
    return paths


def plot_frontier(report: Dict[str, Any], path: str) -> None:
    """Per method a line through its settings (sorted by KL), each point the mean over seeds with
    95% CIs over prompts and seeds on both axes (the DPO paper's figure 2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    for method, pts in report["frontier"].items():
        xs, ys = [p["kl"] for p in pts], [p["gold"] for p in pts]
        xerr = [[p["kl"] - p["kl_ci"][0] for p in pts], [p["kl_ci"][1] - p["kl"] for p in pts]]
        yerr = [[p["gold"] - p["gold_ci"][0] for p in pts], [p["gold_ci"][1] - p["gold"] for p in pts]]
        line = ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, fmt="o-", capsize=3, label=method)
        for p in pts:
            ax.annotate(p["setting"], (p["kl"], p["gold"]), fontsize=6, xytext=(3, 3), textcoords="offset points",
                        color=line[0].get_color())
    ax.set_xlabel("KL(policy || reference), per sequence")
    ax.set_ylabel(f"{'gold' if report['judge'] == 'gold' else 'reward-model'} score")
    ax.set_title("Reward-vs-KL frontier (mean over seeds)")
    ax.grid(alpha=0.3)
    if report["frontier"]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_member_curves(summaries: Dict[str, Dict[str, Any]], members: Dict[str, Dict[str, Any]], path: str) -> None:
    """Per stage, the training loss of each of its runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = list(dict.fromkeys(m["name"] for k, m in members.items() if k in summaries))
    cols = max(1, min(3, len(stages)))
    rows = -(-len(stages) // cols) or 1
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, stage in zip(axes.flat, stages):
        for key in (k for k, m in members.items() if m["name"] == stage and k in summaries):
            run_dir = os.path.dirname(summaries[key]["model_dir"])
            points = [(m["step"], m["loss"]) for m in read_metrics(run_dir) if isinstance(m.get("loss"), (int, float))]
            if len(points) > 1:
                ax.plot(*zip(*points), label=key.split("/", 1)[-1], linewidth=1)
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(stages):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _to_wandb(pipe, report: Dict[str, Any], paths: Dict[str, str]) -> None:
    """The group's report run: the per-run table, the frontier (figure and table), the pairwise
    differences and the win matrix."""
    tracker = Tracker(pipe.tracking, os.path.dirname(paths["report_json"]), name=f"{pipe.name}-report",
                      config={"pipeline": pipe.name, "seeds": list(pipe.seeds), "sweeps": report["settings"]["sweeps"]},
                      group=pipe.name, job_type="report")
    keys = sorted({k for r in report["methods"] for k in r if not k.endswith("_ci")})
    tracker.log_table("comparison", keys, [[r.get(k) for k in keys] for r in report["methods"]])
    tracker.log_table("frontier", ["method", "setting", "seeds", "kl", "kl_low", "kl_high", "score", "score_low",
                                   "score_high", "seed_std"],
                      [[m, p["setting"], p["seeds"], p["kl"], *p["kl_ci"], p["gold"], *p["gold_ci"], p["gold_seed_std"]]
                       for m, pts in report["frontier"].items() for p in pts])
    tracker.log_table("pairwise", ["a", "b", "a_setting", "b_setting", "diff", "low", "high", "text"],
                      [[p["a"], p["b"], p["a_setting"], p["b_setting"], p["diff"], *p["ci"], p["text"]]
                       for p in report["pairwise"]])
    methods = list(report["win_matrix"])
    tracker.log_table("win_matrix", ["method", *methods],
                      [[a, *(None if a == b else report["win_matrix"][a][b] for b in methods)] for a in methods])
    tracker.log_image("frontier", paths["plot_frontier"])
    tracker.log_image("training_curves", paths["plot_training"])
    tracker.finish()
