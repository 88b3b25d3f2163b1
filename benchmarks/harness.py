"""The side-by-side driver every bench_<stage>.py uses: one command runs alternating repetitions
of our stage and of TRL's trainer, each in a fresh process, and writes benchmarks/results/<out>.md
and, beside it, <out>.json: per variant tokens_per_s, peak_pss_mib (whole process tree), startup_s
(the command to the first step's start), wall_s and their ratios against every other variant, with
the model, settings, CPU kind (model name, bf16 flags), versions and date, for scripts to compare
reruns. `--model` chooses the model of every variant (default builtin:tiny-30m).

A benchmark module supplies a `Stage`: which data split, how to run each variant in a child
process (returning per-step losses and step times, plus TRL's token ids), and how many
no-grad forwards per trained token each variant does (for MFU). Raw results are saved to
$ALIGN_BENCH_WORK/<out>-raw.json (default /tmp/align-bench) after every run; `--report-only`
rewrites the Markdown from them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Dict

from benchmarks import common as C

LR = 1e-4
# Per-step losses of the same math in both frameworks must agree to this (absolute): fp32 sums in
# another order differ by ~1e-7; a real difference (masking, normalisation) shows at 1e-3 and up.
LOSS_TOL = 1e-5
# Our variants every bench_<stage>.py offers: the defaults; padded batches (model.padding_free
# off: what the padding-free, shared-prompt forward saves); the actors at Ray's own default
# niceness 15 instead of our ray.worker_niceness=0 (what that setting is worth on a busy machine).
OUR_LABELS = {"ours": "ours", "ours-padded": "ours, padded batches", "ours-nice15": "ours, actor at nice 15"}
OUR_ENV = {"ours-nice15": {"RAY_worker_niceness": "15"}}


def run_ours(a, run, cfg) -> dict:
    """Runs our stage (`run(cfg)`) as variant `a.child`; returns its per-step metrics."""
    if a.child == "ours-padded":
        cfg.model.padding_free = False
    summary = run(cfg, reuse=False)
    return dict(C.our_metrics(cfg.run_dir), first_step_at=summary.get("first_step_at"))


@dataclass
class Stage:
    name: str  # results file stem and title
    title: str
    split: str  # built-in split written for both
    kind: str  # our data kind: sft, pairwise
    children: Dict[str, Callable]  # variant -> child(args) -> {"loss", "step_s", ["ids"], ["tokens"]}
    labels: Dict[str, str]
    settings: str  # one line: what was run
    scalar: bool = False  # a reward model (scalar head) instead of a causal LM
    no_grad_forwards: Dict[str, int] = field(default_factory=dict)  # e.g. TRL's per-step reference forward
    ours_counts_all_tokens: bool = True  # our metrics' "tokens" is the shared definition
    shares_prompts: bool = False  # our stage forwards each pair's prompt once (pairwise kinds)
    loss_steps: int = 0  # steps whose losses must match across frameworks (0: all)
    env: Dict[str, Dict[str, str]] = field(default_factory=dict)  # variant -> extra environment
    bf16: bool = False  # its our_config honours --bf16 (a.precision)


def clock_callback():
    """A TrainerCallback recording when TRL's training starts and each optimizer step ends."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self):
            self.marks = []

        def on_train_begin(self, *args, **kwargs):
            self.marks = [time.perf_counter()]
            self.first_step_at = time.time()  # TRL's reference pass (precompute) is done by now

        def on_step_end(self, *args, **kwargs):
            self.marks.append(time.perf_counter())

        def step_s(self):
            return [b - a for a, b in zip(self.marks, self.marks[1:])]

    return Clock()


def trl_args(a, config_cls, **extra):
    """TRL TrainingArguments matching ours: fused torch AdamW (TRL's default, and ours), constant LR,
    no weight decay, clip 1.0, fp32, no gradient checkpointing, one log per step, no saving."""
    return config_cls(output_dir=os.path.join(a.tmp, "out"), use_cpu=True, report_to="none", seed=C.SEED,
                      per_device_train_batch_size=a.micro_batch, gradient_accumulation_steps=1, max_steps=a.steps,
                      learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                      adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0, optim="adamw_torch_fused",
                      gradient_checkpointing=False, bf16=a.bf16, fp16=False, logging_steps=1, save_strategy="no",
                      train_sampling_strategy="sequential", dataloader_num_workers=0, disable_tqdm=True,
                      max_length=C.MAX_LENGTH, **extra)


def trl_dataset(a):
    """The benchmark rows in our BatchIterator's order, read sequentially by TRL."""
    from datasets import load_dataset

    order = [i for batch in C.batch_order(a.steps * a.micro_batch, a.micro_batch, a.steps) for i in batch]
    return load_dataset("json", data_files=a.data, split="train").select(order)


def trl_train(a, trainer, clock, ids) -> dict:
    """Trains, saves the model (ours exports one too) and returns the child's result."""
    trainer.train()
    trainer.save_model(os.path.join(a.tmp, "model"))
    return {"loss": [h["loss"] for h in trainer.state.log_history if "loss" in h], "step_s": clock.step_s(),
            "ids": ids, "first_step_at": clock.first_step_at}


def lora_settings(r: int) -> dict:
    """The LoRA adapter every variant trains when --lora R is given (ours: model.lora; TRL: peft)."""
    return {"r": r, "alpha": 2 * r, "dropout": 0.0, "target_modules": "all-linear"} if r else {}


def lora_line(r: int) -> str:
    return f"LoRA r={r} alpha {2 * r} on every linear layer but the head (base frozen), " if r else ""


def model_params(model_dir: str) -> int:
    from safetensors import safe_open

    with safe_open(os.path.join(model_dir, "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def report(st: Stage, a, res, tokens, seqs, order, params, peak, load_before):
    """(Markdown, {variant: measures}) of a finished run."""
    variants = list(res)
    base = next((v for v in variants if v.startswith("trl")), "ours")  # ratios are to TRL
    steady = {v: [C.steady(r["step_s"], tokens["real"]) for r in res[v]] for v in variants}
    tps = {v: [s["tokens_per_s"] for s in steady[v]] for v in variants}
    # The fastest steady step of all runs: on a shared machine the least disturbed by other jobs.
    w = C.WARMUP_STEPS

    def positions_per_s(v):  # what each variant forwards: TRL and ours-padded pad, ours packs
        kind = "padded" if v not in ("ours", "ours-nice15") else "shared" if st.shares_prompts else "real"
        return [sum(tokens[kind][w:len(r["step_s"])]) / sum(r["step_s"][w:]) for r in res[v]]

    best = {v: max(n / t for r in res[v] for n, t in zip(tokens["real"][w:], r["step_s"][w:])) for v in variants}
    cols = [["", "tokens/s, steady (median (min-max))", "tokens/s of the fastest steady step (least load-bound)",
             "step s", "end-to-end wall s", "start-up s (command to the first step's start)",
             "wall outside steps s (imports, start-up, ref pass, save, shutdown)",
             "peak RSS MiB of the training process (our actor; TRL's process)", "peak PSS MiB: driver + actors",
             "peak PSS MiB: whole tree (+ Ray daemons, idle workers)", "MFU (median tokens/s)",
             "executed-FLOP utilization (positions really forwarded)",
             f"tokens/s / {st.labels[base]}'s (median; range over same-rep pairs)", "step-1 loss",
             "max abs loss diff vs ours"]]
    for v in variants:
        loss = res[v][0]["loss"]
        pairs = [x["tokens_per_s"] / t["tokens_per_s"] for x, t in zip(steady[v], steady[base])]
        cols.append([
            st.labels[v], C.spread(tps[v]), f"{best[v]:.0f} ({best[v] / best[base]:.2f} x TRL's)",
            C.spread([s["step_s"] for s in steady[v]], "{:.2f}"),
            C.spread([r["wall_s"] for r in res[v]]),
            C.spread([r["startup_s"] for r in res[v]], "{:.1f}") if all(r.get("startup_s") for r in res[v]) else "-",
            C.spread([r["wall_s"] - sum(r["step_s"]) for r in res[v]]),
            C.spread([r["peak_rss"]["train_rss"] / C.MIB for r in res[v]]),
            C.spread([r["peak_rss"]["driver+actors"] / C.MIB for r in res[v]]),
            C.spread([r["peak_rss"]["tree"] / C.MIB for r in res[v]]),
            f"{C.mfu(params, statistics.median(tps[v]), peak, st.no_grad_forwards.get(v, 0)):.1%}",
            f"{C.mfu(params, statistics.median(positions_per_s(v)), peak, st.no_grad_forwards.get(v, 0)):.1%}",
            f"{statistics.median(tps[v]) / statistics.median(tps[base]):.2f} ({min(pairs):.2f}-{max(pairs):.2f})",
            f"{loss[0]:.6f}",
            "-" if v == "ours" else f"{max(abs(x - y) for x, y in zip(loss, res['ours'][0]['loss'])):.1e}"])
    want = [s for i in (j for b in order for j in b) for s in seqs[i]]
    same_ids = all(r["ids"] == want for v in variants if "ids" in res[v][0] for r in res[v])
    repro = {v: max(abs(x - y) for r in res[v] for x, y in zip(r["loss"], res[v][0]["loss"])) for v in variants}
    grid = [list(x) for x in zip(*cols)]
    lines = [C.table(grid[0], grid[1:]), "",
             "Per-step losses (repetition 1):", "",
             C.table(["step", "tokens", "padded tokens"] + [st.labels[v] for v in variants],
                     [[i + 1, tokens["real"][i], tokens["padded"][i]]
                      + [f"{res[v][0]['loss'][i]:.6f}" for v in variants] for i in range(a.steps)]), "",
             "Per repetition: steady tokens/s (mean 1-minute load average during the run; the run itself adds "
             "about 2):", "",
             C.table(["rep"] + [st.labels[v] for v in variants],
                     [[i + 1] + [f"{steady[v][i]['tokens_per_s']:.0f} ({res[v][i]['load']:.1f})" for v in variants]
                      for i in range(len(res[variants[0]]))]), "",
             f"- Identical token ids in TRL and in our data layer, in the same batch order: {same_ids}."]
    if st.ours_counts_all_tokens:
        ok = all(r["tokens"] == tokens["real"][:len(r["tokens"])] for v in variants if "tokens" in res[v][0]
                 for r in res[v])
        lines.append(f"- Our metrics' per-step token counts equal the shared count: {ok}.")
    pad = 1 - sum(tokens["real"]) / sum(tokens["padded"])
    compared = st.loss_steps or a.steps
    diffs = [abs(x - y) for v in variants for r in res[v] for x, y in zip(r["loss"][:compared], res["ours"][0]["loss"])]
    lines.append(f"- Every variant's per-step losses (steps 1..{compared}) within {a.loss_tol:g} of ours: "
                 f"{max(diffs) <= a.loss_tol} (max abs difference {max(diffs):.1e}).")
    lines += [f"- Loss spread across repetitions (max abs): "
              + ", ".join(f"{st.labels[v]} {repro[v]:.1e}" for v in variants) + ".",
              f"- Padding: TRL pads each micro-batch to its longest row, so {pad:.0%} of the token positions it "
              f"forwards are pad; ours forwards the real tokens only (model.padding_free; 'ours, padded "
              f"batches' pads like TRL)"
              + (f", and each pair's prompt once: {1 - sum(tokens['shared']) / sum(tokens['real']):.0%} fewer "
                 "positions than the real tokens" if st.shares_prompts else "")
              + f". Params {params:,}; peak matmul {peak / 1e9:.1f} GFLOP/s ({a.precision}, {os.cpu_count()} "
              f"threads, best of 5 timed before and after the runs); 1-minute load before {load_before}, "
              f"after {C.load_line()}."]

    def med(xs):
        xs = [x for x in xs if x is not None]
        return round(statistics.median(xs), 3) if xs else None

    measures = {v: {"tokens_per_s": med(tps[v]), "peak_pss_mib": med([r["peak_rss"]["tree"] / C.MIB for r in res[v]]),
                    "startup_s": med([r.get("startup_s") for r in res[v]]), "wall_s": med([r["wall_s"] for r in res[v]])}
                for v in variants}
    ratio = C.ratios(measures, list(measures[variants[0]]))
    out = {v: {"label": st.labels[v], **measures[v], "ratios": ratio[v],
               "tokens_per_s_runs": [round(x, 1) for x in tps[v]],
               "tokens_per_s_fastest_step": round(best[v], 1),
               "step_s": med([s["step_s"] for s in steady[v]]),
               "peak_pss_mib_driver_actors": med([r["peak_rss"]["driver+actors"] / C.MIB for r in res[v]]),
               "peak_rss_mib_training_process": med([r["peak_rss"]["train_rss"] / C.MIB for r in res[v]]),
               "mfu": round(C.mfu(params, statistics.median(tps[v]), peak, st.no_grad_forwards.get(v, 0)), 4),
               "executed_flop_utilization": round(C.mfu(params, statistics.median(positions_per_s(v)), peak,
                                                        st.no_grad_forwards.get(v, 0)), 4),
               "loss": res[v][0]["loss"],
               "max_abs_loss_diff_vs_ours": (max(abs(x - y) for x, y in zip(res[v][0]["loss"][:compared],
                                                                             res["ours"][0]["loss"]))
                                             if "ours" in res and v != "ours" else None),
               "load": [round(r["load"], 2) for r in res[v]]}
           for v in variants}
    checks = {"same_token_ids": same_ids, "loss_tolerance": a.loss_tol, "losses_within_tolerance": max(diffs) <= a.loss_tol,
              "max_abs_loss_diff": max(diffs), "padding_fraction": round(pad, 4), "params": params,
              "peak_matmul_gflops": round(peak / 1e9, 1), "peak_matmul_dtype": a.precision}
    return "\n".join(lines), {"variants": out, "checks": checks}


def main(st: Stage, doc: str, steps: int = 16, micro_batch: int = 8, variants: str = "") -> None:
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--micro-batch", type=int, default=micro_batch)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--variants", default=variants or ",".join(st.children))
    p.add_argument("--out", default=st.name, help="results file stem (benchmarks/results/OUT.md)")
    p.add_argument("--report-only", action="store_true", help="rewrite OUT.md from the last run's raw results")
    p.add_argument("--child", choices=list(st.children))
    p.add_argument("--model", help=f"the model of every variant (default {C.MODEL}); e.g. "
                                   "builtin:smollm2-135m-instruct, or a model folder")
    p.add_argument("--max-length", type=int, default=C.MAX_LENGTH, help="tokens per sequence, prompt included")
    p.add_argument("--max-prompt-length", type=int, default=C.MAX_PROMPT_LENGTH)
    p.add_argument("--loss-tol", type=float, help="per-step loss agreement asked of every variant (default "
                                                  "1e-5 on builtin:tiny-*, 1e-4 on a real model)")
    p.add_argument("--lora", type=int, default=0, help="LoRA rank in every variant (alpha 2r, dropout 0, every "
                                                       "linear layer but the head; TRL through peft); 0: full")
    p.add_argument("--bf16", action="store_true", help="bf16 in every variant (ours: deepspeed.precision=bf16; "
                                                        "TRL: bf16=True); compare with an fp32 run of the same command")
    p.add_argument("--data"), p.add_argument("--tmp")
    a = p.parse_args()
    a.precision = "bf16" if a.bf16 else "fp32"
    if a.bf16 and not st.bf16:
        p.error(f"--bf16: bench_{st.name}.py does not set our stage's precision yet (bench_dpo.py does)")
    C.MAX_LENGTH, C.MAX_PROMPT_LENGTH = a.max_length, a.max_prompt_length
    if a.child:
        out = st.children[a.child](a)
        with open(os.path.join(a.tmp, "result.json"), "w") as fh:
            json.dump(out, fh)
        return
    started, load_before = time.perf_counter(), C.load_line()
    a.model = a.model or C.MODEL
    if a.loss_tol is None:
        a.loss_tol = 5e-2 if a.bf16 else LOSS_TOL if a.model.startswith("builtin:tiny") else 1e-4
    rows = a.steps * a.micro_batch
    paths = C.prepare(st.split, rows, scalar=st.scalar, model=a.model)
    seqs = C.our_tokens(st.kind, paths["data"], paths["model"])
    order = C.batch_order(rows, a.micro_batch, a.steps)
    prompts = C.our_prompt_lengths(paths["data"], paths["model"]) if st.shares_prompts else None
    tokens = C.step_tokens(seqs, order, prompts)
    C.prebuild_deepspeed_ops()
    peak = C.peak_flops(dtype=a.precision)
    variants = a.variants.split(",")
    script = os.path.join(C.REPO, "benchmarks", f"bench_{st.name}.py")
    res = {v: [] for v in variants}
    if a.report_only:
        with open(os.path.join(C.WORK, f"{a.out}-raw.json")) as fh:
            raw = json.load(fh)
        res, peak, load_before, elapsed = raw["res"], raw["peak"], raw["load_before"], raw["elapsed"]
    for rep in range(0 if a.report_only else a.reps):
        for v in (variants if rep % 2 == 0 else variants[::-1]):
            tmp = tempfile.mkdtemp(dir=C.WORK, prefix=f"{st.name}-{v}-")
            args = ["--child", v, "--model", paths["model"], "--data", paths["data"], "--tmp", tmp,
                    "--steps", str(a.steps), "--micro-batch", str(a.micro_batch),
                    "--max-length", str(a.max_length), "--max-prompt-length", str(a.max_prompt_length),
                    "--lora", str(a.lora)] + (["--bf16"] if a.bf16 else [])
            r = C.run_child(script, args, os.path.join(tmp, "result.json"), st.env.get(v))
            if "ids" in r:  # flattened; the report compares them with our tokenization
                r["ids"] = [s for row in r["ids"] for s in row]
            res[v].append(r)
            with open(os.path.join(C.WORK, f"{a.out}-raw.json"), "w") as fh:  # --report-only reads it
                json.dump({"res": res, "peak": peak, "load_before": load_before, "model": a.model,
                           "elapsed": time.perf_counter() - started}, fh)
            print(f"rep {rep + 1} {v}: {C.steady(r['step_s'], tokens['real'])['tokens_per_s']:.0f} tokens/s, "
                  f"wall {r['wall_s']:.0f} s, load {C.load_line()}", flush=True)
            shutil.rmtree(tmp, ignore_errors=True)
    if not a.report_only:
        peak = max(peak, C.peak_flops(dtype=a.precision))  # the best seen before and after: load lowers it, not raises it
        elapsed = time.perf_counter() - started
    m = C.machine()
    command = (f".venv/bin/python benchmarks/bench_{st.name}.py --model {a.model} --steps {a.steps} "
               f"--micro-batch {a.micro_batch} --max-length {a.max_length} --max-prompt-length {a.max_prompt_length} "
               f"--reps {a.reps} --variants {a.variants}" + (f" --lora {a.lora}" if a.lora else "") + (" --bf16" if a.bf16 else ""))
    body, measured = report(st, a, res, tokens, seqs, order, model_params(paths["model"]), peak, load_before)
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    text = "\n".join([
        f"# {st.title}", "",
        f"`{command}` ({elapsed:.0f} s in all; {date})", "",
        f"Machine: {m['machine']}. Versions: {m['versions']}.", "",
        f"{st.settings} {a.model} saved once, {a.precision}, {lora_line(a.lora)}{a.steps} steps, micro-batch {a.micro_batch}, "
        f"max_length {C.MAX_LENGTH} (prompt {C.MAX_PROMPT_LENGTH}), AdamW lr {LR} constant, clip 1.0, seed {C.SEED}, {os.cpu_count()} torch threads "
        f"in both; {a.reps} repetitions, alternating order; steady state = steps {C.WARMUP_STEPS + 1}..{a.steps}. Memory: psutil, the "
        "run's process tree sampled every 2 s, peak RSS from the kernel's high-water mark; PSS splits shared pages (Ray's "
        "object store, libraries) between the processes mapping them, so the sums are not inflated.", "",
        body])
    print(text)
    print("wrote", C.write_result(a.out, text))
    print("wrote", C.write_json(a.out, {
        "benchmark": st.name, "title": st.title, "command": command, "date": date, "elapsed_s": round(elapsed, 1),
        "model": a.model, "settings": {"steps": a.steps, "micro_batch": a.micro_batch, "max_length": a.max_length,
                                       "max_prompt_length": a.max_prompt_length, "reps": a.reps, "precision": a.precision,
                                       "lora": lora_settings(a.lora),
                                       "lr": LR, "seed": C.SEED, "torch_threads": os.cpu_count(),
                                       "steady_steps_from": C.WARMUP_STEPS + 1},
        "machine": {k: m[k] for k in ("cpu", "cores", "ram_gib", "python")}, "versions": m["packages"],
        "load_1min": {"before": load_before, "after": C.load_line()}, **measured}))
