"""PPO and GRPO: our per-step time split, and the per-rollout time of TRL's online RL trainer at the
same rollout size and response length.

    .venv/bin/python benchmarks/bench_ppo.py        # ours (PPO) and TRL x 2 reps: about 6-8 min on 2 cores
    .venv/bin/python benchmarks/bench_ppo.py --variants ours,ours-grpo,ours-grpo-refpol,trl   # ~12 min

Variants: `ours` (PPO with a value model), `ours-grpo` (our GRPO at TRL's settings: 2 samples per
prompt, the k3 KL as a loss term, the reward model as the reward; policy, reference and reward
groups), `ours-grpo-refpol` (the same with `reference_on_policy`: the policy actor holds the
reference, so 2 groups), `ours-grpo-onegroup` (`reward_on_policy` too: 1 group), `trl`.

TRL 1.16 ships no PPOTrainer (`hasattr(trl, "PPOTrainer")` is False, and none is under
trl.experimental), so the peer is its GRPOTrainer, the trainer a TRL user runs for online RL from a
reward model: same policy, reference and reward model weights, same prompts, 32 completions per
rollout of at most 32 new tokens (temperature 1), KL weight 0.05 against the reference, and the
same update schedule: 2 epochs x 2 minibatches of 16 (`steps_per_generation=2`,
`num_iterations=2`), AdamW lr 1e-4. GRPO needs at least 2 completions per prompt, so it takes 16
prompts x 2 where ours takes 32 x 1. It trains no value model; ours does (PPO's critic), so ours
does strictly more work per rollout: policy AND value updates, four frozen/trained forwards.

Ours: rlhf.ppo.run with configs/ppo/default.yaml's shape: four groups of one actor (policy, value,
reference, reward; 0.5 CPU and so 1 torch thread each), micro-batch 16; builtin:tiny-30m (policy,
reference) and its scalar-head copy (reward, value), saved once. Per step, from our metrics:
generation (the policy samples), inference (policy, reference, value and reward forwards, in
parallel), train (policy and value updates, in parallel). TRL: one process, 2 torch threads; a
rollout's time is the time of the 4 optimizer steps it feeds (its generation happens in the first).
Writes benchmarks/results/ppo.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common as C  # noqa: E402
from benchmarks.harness import LR, clock_callback, model_params  # noqa: E402

PHASES = ("generate", "inference", "train")
ROLLOUT, NEW_TOKENS, MICRO, EPOCHS, MINIBATCHES, KL = 32, 32, 16, 2, 2, 0.05


def our_config(a):
    """PPO (`ours`), or GRPO (`ours-grpo`) with TRL's settings: 2 samples per prompt, the k3 KL as a
    loss term, the reward model as the reward; then only 3 groups start (no value model)."""
    from align.config import DeepSpeedConfig, ModelConfig, OptimConfig, RayConfig, TrackingConfig, TrainConfig
    from align.generation import SamplingConfig
    from rlhf.ppo import AdvantageConfig, KLConfig, PPOConfig, RolloutConfig

    grpo = a.child.startswith("ours-grpo")
    critic_free = dict(advantage=AdvantageConfig(estimator="grpo"), rollout=RolloutConfig(group_size=2),
                       kl=KLConfig(coef=KL, estimator="k3", mode="loss")) if grpo else dict(kl=KLConfig(coef=KL))
    # ours-grpo-refpol: the policy actor holds the reference too (2 groups: policy, reward model).
    # ours-grpo-onegroup: the policy actor holds the reference and the reward model (1 group).
    groups = {"ours-grpo-refpol": 2, "ours-grpo-onegroup": 1}.get(a.child, 3 if grpo else 4)
    return PPOConfig(model=ModelConfig(name_or_path=a.model), reward_model=a.reward, data=C.data_config(a.data),
                     **critic_free, reference_on_policy=a.child in ("ours-grpo-refpol", "ours-grpo-onegroup"),
                     reward_on_policy=a.child == "ours-grpo-onegroup",
                     ray=RayConfig(cpus_per_actor=os.cpu_count() / groups, object_store_memory=256 * C.MIB),
                     rollout_batch_size=ROLLOUT, generation_batch_size=ROLLOUT, ppo_epochs=EPOCHS,
                     num_minibatches=MINIBATCHES, sampling=SamplingConfig(max_new_tokens=NEW_TOKENS),
                     optim=OptimConfig(lr=LR), eval_prompts=0, eval_at_start=False,
                     deepspeed=DeepSpeedConfig(micro_batch_size=MICRO),
                     tracking=TrackingConfig(backend="none"), train=TrainConfig(max_steps=a.steps, resume=False),
                     run_dir=os.path.join(a.tmp, "run"), seed=C.SEED)


def child(a) -> dict:
    from align.tracking import read_metrics
    from rlhf.ppo import run

    cfg = our_config(a)
    summary = run(cfg, reuse=False)
    return {"steps": [m for m in read_metrics(cfg.run_dir) if "time/step" in m],
            "first_step_at": summary.get("first_step_at")}


def child_trl(a) -> dict:
    """TRL's GRPOTrainer on the same weights and prompts; per-rollout times and generated tokens."""
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(os.cpu_count())
    tok = AutoTokenizer.from_pretrained(a.model)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, attn_implementation="sdpa")
    per_rollout = EPOCHS * MINIBATCHES  # optimizer steps fed by one generation
    args = GRPOConfig(output_dir=os.path.join(a.tmp, "out"), use_cpu=True, report_to="none", seed=C.SEED,
                      per_device_train_batch_size=MICRO, gradient_accumulation_steps=1,
                      generation_batch_size=ROLLOUT, num_generations=2, num_iterations=EPOCHS,
                      max_completion_length=NEW_TOKENS, temperature=1.0, beta=KL, learning_rate=LR,
                      lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                      max_steps=a.steps * per_rollout, logging_steps=1, save_strategy="no", disable_tqdm=True,
                      dataloader_num_workers=0, bf16=False, fp16=False, gradient_checkpointing=False)
    data = load_dataset("json", data_files=a.data, split="train").select_columns(["prompt"])
    clock = clock_callback()
    trainer = GRPOTrainer(model=model, reward_funcs=a.reward, args=args, train_dataset=data,
                          processing_class=tok, callbacks=[clock])
    trainer.train()
    steps = clock.step_s()
    rollouts = [sum(steps[i:i + per_rollout]) for i in range(0, len(steps) - per_rollout + 1, per_rollout)]
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    return {"rollout_s": rollouts, "step_s": steps, "mean_length": lengths, "first_step_at": clock.first_step_at}


def trl_split(runs) -> list:
    """TRL's rollout in two parts, from its optimizer steps' times: the first step of a rollout
    generates, scores and runs the reference and old-policy forwards before its update; the other
    steps are updates only."""
    per = EPOCHS * MINIBATCHES
    firsts, updates = [], []
    for r in runs:
        steps = r.get("step_s") or []
        for i in range(per, len(steps) - per + 1, per):  # rollout 1 is warm-up
            firsts.append(steps[i])
            updates += steps[i + 1:i + per]
    if not updates:
        return []
    update = statistics.median(updates)
    return [f"- TRL's rollout split: generation + scoring + reference/old forwards "
            f"{statistics.median(firsts) - update:.2f} s (first step minus a median update), "
            f"{per} updates x {update:.2f} s."]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=6, help="rollouts per run (the first is warm-up)")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--variants", default="ours,trl")
    p.add_argument("--child", choices=["ours", "ours-grpo", "ours-grpo-refpol", "ours-grpo-onegroup", "trl"])
    p.add_argument("--model", help=f"policy of both (default {C.MODEL}); reward and value models are its "
                                   "scalar-head copy")
    p.add_argument("--out", default="ppo", help="results file stem (benchmarks/results/OUT.md and OUT.json)")
    p.add_argument("--reward"), p.add_argument("--data"), p.add_argument("--tmp")
    a = p.parse_args()
    if a.child:
        with open(os.path.join(a.tmp, "result.json"), "w") as fh:
            json.dump((child_trl if a.child == "trl" else child)(a), fh)
        return
    import trl

    started, load_before = time.perf_counter(), C.load_line()
    a.model = a.model or C.MODEL
    policy = C.prepare("prompts", ROLLOUT * a.steps, model=a.model)
    reward = C.prepare("prompts", ROLLOUT * a.steps, scalar=True, model=a.model)
    C.prebuild_deepspeed_ops()
    peak1, peak = C.peak_flops(threads=1), C.peak_flops()
    variants = a.variants.split(",")
    res = {v: [] for v in variants}
    for rep in range(a.reps):
        for v in (variants if rep % 2 == 0 else variants[::-1]):
            tmp = tempfile.mkdtemp(dir=C.WORK, prefix=f"ppo-{v}-")
            args = ["--child", v, "--model", policy["model"], "--reward", reward["model"], "--data", policy["data"],
                    "--tmp", tmp, "--steps", str(a.steps)]
            res[v].append(C.run_child(__file__, args, os.path.join(tmp, "result.json")))
            print(f"rep {rep + 1} {v}: wall {res[v][-1]['wall_s']:.0f} s, load {C.load_line()}", flush=True)
    peak1, peak = max(peak1, C.peak_flops(threads=1)), max(peak, C.peak_flops())  # best before/after
    params = model_params(policy["model"])
    m = C.machine()
    command = (f".venv/bin/python benchmarks/bench_ppo.py --model {a.model} --steps {a.steps} --reps {a.reps} "
               f"--variants {a.variants}")
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    text = ["# PPO: ours (rlhf.ppo) per-step split, and TRL's GRPOTrainer at the same rollout size", "",
            f"`{command}` ({time.perf_counter() - started:.0f} s in all; {date}). trl {trl.__version__}: "
            f"`hasattr(trl, 'PPOTrainer')` = {hasattr(trl, 'PPOTrainer')}; the peer is GRPOTrainer (see the "
            "script's docstring for the matched settings).", "",
            f"Machine: {m['machine']}. Versions: {m['versions']}.", "",
            f"{a.model} ({params:,} params; reward and value models are its scalar-head copy), "
            f"{ROLLOUT} completions per rollout of <= {NEW_TOKENS} new tokens, {EPOCHS} epochs x {MINIBATCHES} "
            f"minibatches of {MICRO}, KL weight {KL}, fp32; {a.steps} rollouts x {a.reps} runs, medians over "
            "rollouts 2..N of every run.", ""]
    label = {"ours": "ours (PPO: policy + value)", "ours-grpo": "ours (GRPO, K=2: policy only)",
             "ours-grpo-refpol": "ours (GRPO, K=2, reference on the policy actor)",
             "ours-grpo-onegroup": "ours (GRPO, K=2, reference and reward model on the policy actor)",
             "trl": "TRL GRPOTrainer (policy only)"}
    for v in (x for x in variants if x.startswith("ours")):
        steady = [s for r in res[v] for s in r["steps"][1:]]  # step 1 is warm-up
        models = 3 if v.startswith("ours-grpo") else 4  # forwards in inference: policy, reference, reward (+ value)

        def med(key):
            return statistics.median(s[key] for s in steady)

        step_s = med("time/step")
        rows = [[f"{ph}", f"{med('time/' + ph):.2f}", f"{med('time/' + ph) / step_s:.0%}"] for ph in PHASES]
        rows.append(["step (total)", f"{step_s:.2f}", "100%"])
        gen, train = med("tokens/s_generate"), med("tokens/s_train")
        seq_tokens = statistics.median(s["tokens/s_train"] * s["time/train"] / EPOCHS for s in steady)
        infer = seq_tokens / med("time/inference")
        groups = {"ours-grpo": "three groups x 1 actor (policy, reference, reward model), 0.67 CPU each",
                  "ours-grpo-refpol": "two groups x 1 actor (policy holding the reference, reward model), 1 CPU each",
                  "ours-grpo-onegroup": "one group of 1 actor (policy holding the reference and the reward model), 2 CPUs",
                  }.get(v, "four groups x 1 actor (policy, value, reference, reward), 0.5 CPU = 1 torch thread each")
        trained = 1 if v.startswith("ours-grpo") else 2
        text += [f"{label[v]}: {groups}, ZeRO-0, micro-batch 16.", "",
                 C.table(["phase", "s / step (median)", "share"], rows), "",
                 C.table(["throughput", "value", "MFU"], [
                     ["generation, new tokens/s (policy actor, KV cache)", f"{gen:.0f}",
                      f"{2 * params * gen / peak1:.1%} of 1 thread"],
                     [f"inference, sequence tokens/s (policy, reference, reward{', value' if models == 4 else ''} "
                      "forward, in parallel)", f"{infer:.0f}", f"{models * 2 * params * infer / peak:.1%}"],
                     [f"train, sequence tokens/s x epochs ({'policy + value, in parallel' if trained == 2 else 'policy'})",
                      f"{train:.0f}", f"{trained * 6 * params * train / peak:.1%}"]]), ""]
    cols = {}
    for v in variants:
        if v.startswith("ours"):
            per = [s["time/step"] for r in res[v] for s in r["steps"][1:]]
            length = [s["response/length"] for r in res[v] for s in r["steps"][1:]]
        else:
            per = [t for r in res[v] for t in r["rollout_s"][1:]]
            length = [x for r in res[v] for x in r["mean_length"][1:]]
        cols[v] = {"per": per, "length": length, "wall": [r["wall_s"] for r in res[v]],
                   "startup": [r["startup_s"] for r in res[v] if r.get("startup_s")],
                   "tree": [r["peak_rss"]["tree"] / C.MIB for r in res[v]],
                   "train": [r["peak_rss"]["train_rss"] / C.MIB for r in res[v]]}
    base = statistics.median(cols["trl"]["per"]) if "trl" in cols else None
    text += [C.table(["", *(label[v] for v in variants)], [
        ["s per rollout (median (min-max))", *(C.spread(cols[v]["per"], "{:.2f}") for v in variants)],
        ["mean response length, tokens", *(C.spread(cols[v]["length"], "{:.1f}") for v in variants)],
        ["s per rollout / TRL's", *(f"{statistics.median(cols[v]['per']) / base:.2f}" if base else "-"
                                    for v in variants)],
        ["end-to-end wall s", *(C.spread(cols[v]["wall"]) for v in variants)],
        ["peak RSS MiB, largest training process", *(C.spread(cols[v]["train"]) for v in variants)],
        ["peak PSS MiB, whole process tree", *(C.spread(cols[v]["tree"]) for v in variants)]]), "",
        *(trl_split(res["trl"]) if "trl" in res else []),
        f"- Peak matmul: {peak1 / 1e9:.1f} GFLOP/s on 1 thread, {peak / 1e9:.1f} on {os.cpu_count()} (fp32, best of "
        f"5, before and after). MFU = 2 x params per generated token; 2 x params x 4 models per inference "
        f"token; 6 x params x 2 models per trained token. Load before {load_before}, after {C.load_line()}."]
    text = "\n".join(text)
    print(text)
    print("wrote", C.write_result(a.out, text))

    def med(xs):
        return round(statistics.median(xs), 3) if xs else None

    # tokens/s here: generated (response) tokens per second of rollout wall time, the same count for both.
    measures = {v: {"tokens_per_s": med([ROLLOUT * n / t for n, t in zip(cols[v]["length"], cols[v]["per"])]),
                    "peak_pss_mib": med(cols[v]["tree"]), "startup_s": med(cols[v]["startup"]),
                    "wall_s": med(cols[v]["wall"])} for v in variants}
    ratio = C.ratios(measures, ["tokens_per_s", "peak_pss_mib", "startup_s", "wall_s"])
    print("wrote", C.write_json(a.out, {
        "benchmark": "ppo", "command": command, "date": date, "model": a.model,
        "settings": {"steps": a.steps, "reps": a.reps, "rollout": ROLLOUT, "new_tokens": NEW_TOKENS, "micro_batch": MICRO,
                     "epochs": EPOCHS, "minibatches": MINIBATCHES, "kl": KL, "precision": "fp32",
                     "tokens_per_s": "generated tokens per second of rollout wall time"},
        "machine": {k: m[k] for k in ("cpu", "cores", "ram_gib", "python")}, "versions": m["packages"],
        "load_1min": {"before": load_before, "after": C.load_line()},
        "variants": {v: {"label": label[v], **measures[v], "ratios": ratio[v],
                         "s_per_rollout": med(cols[v]["per"]), "peak_rss_mib_training_process": med(cols[v]["train"])}
                     for v in variants}}))


if __name__ == "__main__":
    main()
