"""PPO: our time split only. TRL 1.16 ships no PPOTrainer (`hasattr(trl, "PPOTrainer")` is False,
and there is none under trl.experimental either), so there is nothing to run side by side.

    .venv/bin/python benchmarks/bench_ppo.py        # about 4-6 min on 2 cores; --steps, --reps

Our rlhf.ppo.run with configs/ppo/default.yaml's shape: four groups of one actor (policy, value,
reference, reward; 0.5 CPU and so 1 torch thread each), 32 prompts per step, one response each of
at most 32 new tokens, 2 PPO epochs x 2 minibatches, micro-batch 16; builtin:tiny-30m (policy,
reference) and its scalar-head copy (reward, value), saved once. Per step, from our metrics:
generation (the policy samples), inference (policy, reference, value and reward forwards, in
parallel), train (policy and value updates, in parallel). Writes benchmarks/results/ppo.md.
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
from benchmarks.harness import LR, model_params  # noqa: E402

PHASES = ("generate", "inference", "train")


def our_config(a):
    from align.config import DeepSpeedConfig, ModelConfig, OptimConfig, RayConfig, TrackingConfig, TrainConfig
    from align.generation import SamplingConfig
    from rlhf.ppo import PPOConfig

    return PPOConfig(model=ModelConfig(name_or_path=a.model), reward_model=a.reward, data=C.data_config(a.data),
                     ray=RayConfig(cpus_per_actor=os.cpu_count() / 4, object_store_memory=256 * C.MIB),
                     rollout_batch_size=32, generation_batch_size=32, ppo_epochs=2, num_minibatches=2,
                     sampling=SamplingConfig(max_new_tokens=32), optim=OptimConfig(lr=LR), eval_prompts=0,
                     eval_at_start=False, deepspeed=DeepSpeedConfig(micro_batch_size=16),
                     tracking=TrackingConfig(backend="none"), train=TrainConfig(max_steps=a.steps, resume=False),
                     run_dir=os.path.join(a.tmp, "run"), seed=C.SEED)


def child(a) -> dict:
    from align.tracking import read_metrics
    from rlhf.ppo import run

    cfg = our_config(a)
    run(cfg, reuse=False)
    return {"steps": [m for m in read_metrics(cfg.run_dir) if "time/step" in m]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--child", action="store_true")
    p.add_argument("--model"), p.add_argument("--reward"), p.add_argument("--data"), p.add_argument("--tmp")
    a = p.parse_args()
    if a.child:
        with open(os.path.join(a.tmp, "result.json"), "w") as fh:
            json.dump(child(a), fh)
        return
    import trl

    started, load_before = time.perf_counter(), C.load_line()
    policy, reward = C.prepare("prompts", 32 * a.steps), C.prepare("prompts", 32 * a.steps, scalar=True)
    C.prebuild_deepspeed_ops()
    peak1, peak = C.peak_flops(threads=1), C.peak_flops()
    runs = []
    for rep in range(a.reps):
        tmp = tempfile.mkdtemp(dir=C.WORK, prefix="ppo-")
        args = ["--child", "--model", policy["model"], "--reward", reward["model"], "--data", policy["data"],
                "--tmp", tmp, "--steps", str(a.steps)]
        runs.append(C.run_child(__file__, args, os.path.join(tmp, "result.json")))
        print(f"rep {rep + 1}: wall {runs[-1]['wall_s']:.0f} s, load {C.load_line()}", flush=True)
    peak1, peak = max(peak1, C.peak_flops(threads=1)), max(peak, C.peak_flops())  # best before/after
    params = model_params(policy["model"])
    steady = [s for r in runs for s in r["steps"][1:]]  # step 1 is warm-up

    def med(key):
        return statistics.median(s[key] for s in steady)

    step_s = med("time/step")
    rows = [[f"{ph}", f"{med('time/' + ph):.2f}", f"{med('time/' + ph) / step_s:.0%}"] for ph in PHASES]
    rows.append(["step (total)", f"{step_s:.2f}", "100%"])
    gen = med("tokens/s_generate")
    train = med("tokens/s_train")
    seq_tokens = statistics.median(s["tokens/s_train"] * s["time/train"] / 2 for s in steady)  # per PPO epoch
    infer = seq_tokens / med("time/inference")
    m = C.machine()
    text = "\n".join([
        "# PPO: our time split (TRL 1.16 has no PPOTrainer to compare with)", "",
        f"`.venv/bin/python benchmarks/bench_ppo.py --steps {a.steps} --reps {a.reps}` "
        f"({time.perf_counter() - started:.0f} s in all). trl {trl.__version__}: "
        f"`hasattr(trl, 'PPOTrainer')` = {hasattr(trl, 'PPOTrainer')}.", "",
        f"Machine: {m['machine']}. Versions: {m['versions']}.", "",
        "Four groups x 1 actor (policy, value, reference, reward), 0.5 CPU = 1 torch thread each, builtin:tiny-30m "
        f"({params:,} params; the value and reward models are its scalar-head copy), 32 prompts/step, <= 32 new "
        f"tokens, 2 PPO epochs x 2 minibatches, micro-batch 16, fp32, ZeRO-0; {a.steps} steps x {a.reps} runs, "
        "medians over steps 2..N of every run.", "",
        C.table(["phase", "s / step (median)", "share"], rows), "",
        C.table(["throughput", "value", "MFU"], [
            ["generation, new tokens/s (policy actor, 1 thread, KV cache)", f"{gen:.0f}",
             f"{2 * params * gen / peak1:.1%} of 1 thread"],
            ["inference, sequence tokens/s (4 models forward, in parallel)", f"{infer:.0f}",
             f"{4 * 2 * params * infer / peak:.1%}"],
            ["train, sequence tokens/s x epochs (policy + value, in parallel)", f"{train:.0f}",
             f"{2 * 6 * params * train / peak:.1%}"]]), "",
        f"- End-to-end wall per run: {C.spread([r['wall_s'] for r in runs])} s; peak PSS of the process tree "
        f"(driver, 4 actors, Ray daemons): {C.spread([r['peak_rss']['tree'] / C.MIB for r in runs])} MiB; "
        f"driver + actors: {C.spread([r['peak_rss']['driver+actors'] / C.MIB for r in runs])} MiB.",
        f"- Peak matmul: {peak1 / 1e9:.1f} GFLOP/s on 1 thread, {peak / 1e9:.1f} on {os.cpu_count()} (fp32, best of "
        f"5, before and after). MFU = 2 x params per generated token; 2 x params x 4 models per inference "
        f"token; 6 x params x 2 models per trained token. Load before {load_before}, after {C.load_line()}."])
    print(text)
    print("wrote", C.write_result("ppo", text))


if __name__ == "__main__":
    main()
