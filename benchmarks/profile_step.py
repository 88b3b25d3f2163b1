"""Where one of our training steps spends its time: the stage's worker (the same class that runs
inside the Ray actor) built in this process as a 1-rank gloo group, with the benchmark's settings.

    .venv/bin/python benchmarks/profile_step.py --stage dpo     # or sft, rm, grpo; about 1-2 min

Prints (and writes benchmarks/results/profile_<stage>.md): the step time in-process (no Ray) next to
the op time torch.profiler sees, the ops by self CPU time, and from cProfile the cumulative time of
the phases of a step (forward, backward, DeepSpeed's gradient all-reduce, clipping, AdamW).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import socket
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common as C  # noqa: E402

SPLITS = {"dpo": ("preferences", False), "sft": ("sft", False), "rm": ("preferences", True), "grpo": ("prompts", False)}
# Functions whose cumulative time names the phases of a step (matched by name, any module).
PHASES = ("train_step", "sequence_logprobs", "sequence_scores", "forward", "backward", "_engine_run_backward",
          "allreduce_gradients", "buffered_allreduce_fallback", "allreduce_bucket", "step", "_take_model_step",
          "clip_grad_norm_", "get_global_norm", "adamw", "_multi_tensor_adamw", "gather_logprobs", "__next__",
          "__iter__", "collate_indexed_pairs", "collate_scored_pairs", "collate_sft", "all_reduce_sum", "tick", "get_global_grad_norm")
CATEGORIES = (("matmul", ("aten::mm", "aten::addmm", "aten::bmm")),
              ("attention", ("scaled_dot_product", "flash_attention")),
              ("optimizer (foreach)", ("aten::_foreach",)),
              ("copies / cat / fill", ("aten::copy_", "aten::cat", "aten::fill_", "aten::zero_", "aten::clone")))


def worker(stage: str, a):
    from align.engine.deepspeed_engine import init_distributed

    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    init_distributed("gloo")
    if stage == "dpo":
        from benchmarks.bench_dpo import our_config
        from direct.dpo import DPOWorker as cls
    elif stage == "sft":
        from benchmarks.bench_sft import our_config
        from rlhf.sft import SFTWorker as cls
    elif stage == "grpo":
        return GRPOUpdate(a)
    else:
        from benchmarks.bench_rm import our_config
        from reward_model.train import RMWorker as cls
    return cls(our_config(a))


class GRPOUpdate:
    """`--stage grpo`: the policy rank of bench_ppo's ours-grpo (tiny-30m, 32 rows of <= 32 new
    tokens) samples one rollout; a "step" is then one minibatch update (16 rows, one optimizer
    step), as the rollout's update runs 4 of them."""

    def __init__(self, a):
        import torch

        from benchmarks.bench_ppo import our_config
        from rlhf.ppo_workers import PolicyWorker

        a.child, a.reward = "ours-grpo", a.model
        self.worker = PolicyWorker(our_config(a))
        self.engine = self.worker.engine
        rollout = self.worker.rollout(1)
        rows = [{"prompt": p, "response": r} for p, r in zip(rollout["prompt"], rollout["response"])]
        logps = [o["logprobs"] for o in self.worker.logprobs(rows)]
        gen = torch.Generator().manual_seed(0)
        self.rows = [dict(row, old_logprobs=lp, ref_logprobs=lp, advantages=torch.randn(len(lp), generator=gen))
                     for row, lp in zip(rows, logps)]
        self.i = 0

    def train_step(self):
        part = self.rows[16 * (self.i % 2):16 * (self.i % 2) + 16]
        self.i += 1
        return self.worker.train_minibatch(part, num_tokens=float(len(part)))

    def close(self):
        self.worker.close()


def overheads(engine, reps: int = 3):
    """Isolated per-step costs (median s): DeepSpeed's gradient all-reduce (on 1 rank a pure copy:
    flatten, scale by 1/world, all-reduce, copy back) and torch AdamW's three implementations."""
    import torch

    params = [p for p in engine.module.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p)

    def timed(fn):
        out = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
        return statistics.median(out)

    opt = engine.optimizer
    rows = [["DeepSpeed allreduce_gradients (ZeRO-0, 1 rank)", timed(engine.allreduce_gradients)]]
    for name, flags in (("AdamW step, torch default on CPU (single-tensor loop; what ours and TRL 'adamw_torch' run)",
                         {}), ("AdamW step, foreach=True", {"foreach": True}),
                        ("AdamW step, fused=True (TRL's default 'adamw_torch_fused')", {"fused": True})):
        for g in opt.param_groups:
            g["foreach"], g["fused"] = flags.get("foreach"), flags.get("fused")
        rows.append([name, timed(opt.step)])
    rows.append(["clip_grad_norm_ (torch)", timed(lambda: torch.nn.utils.clip_grad_norm_(params, 1.0))])
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stage", choices=sorted(SPLITS), default="dpo")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--model", default=C.MODEL, help="e.g. builtin:smollm2-135m-instruct")
    p.add_argument("--max-length", type=int, default=C.MAX_LENGTH)
    p.add_argument("--max-prompt-length", type=int, default=C.MAX_PROMPT_LENGTH)
    p.add_argument("--bf16", action="store_true", help="deepspeed.precision=bf16")
    p.add_argument("--out", help="results file stem (default profile_<stage>)")
    a = p.parse_args()
    a.precision, a.lora = ("bf16" if a.bf16 else "fp32"), 0
    C.MAX_LENGTH, C.MAX_PROMPT_LENGTH = a.max_length, a.max_prompt_length
    import torch
    from torch.profiler import ProfilerActivity, profile

    split, scalar = SPLITS[a.stage]
    paths = C.prepare(split, a.steps * a.micro_batch, scalar=scalar, model=a.model)
    a.model, a.data, a.tmp = paths["model"], paths["data"], tempfile.mkdtemp(dir=C.WORK, prefix="profile-")
    torch.set_num_threads(os.cpu_count())
    w = worker(a.stage, a)
    for _ in range(2):  # warm-up
        w.train_step()
    times = []
    for _ in range(2):
        t = time.perf_counter()
        w.train_step()
        times.append(time.perf_counter() - t)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        w.train_step()
        prof_step = time.perf_counter() - t
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    cats = {name: sum(e.self_cpu_time_total for e in events if any(k in e.key for k in keys)) / 1e6
            for name, keys in CATEGORIES}
    cats["other ops (elementwise: RMSNorm, RoPE, SiLU, softmax, loss)"] = total - sum(cats.values())
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]
    pr = cProfile.Profile()
    pr.enable()
    t = time.perf_counter()
    w.train_step()
    cprof_step = time.perf_counter() - t
    pr.disable()
    stats = pstats.Stats(pr, stream=io.StringIO())
    phases = {}
    for (path, _, fn), (_, _, _, cum, _) in stats.stats.items():
        if fn in PHASES and cum > 0.005 * cprof_step:
            where = path.split("site-packages/")[-1].replace(C.REPO + "/", "")
            phases[f"{fn} ({where})"] = max(cum, phases.get(f"{fn} ({where})", 0.0))
    lines = [f"# Profile of one {a.stage} step (ours, in-process worker, 1 rank, no Ray)", "",
             f"`.venv/bin/python benchmarks/profile_step.py {' '.join(sys.argv[1:])}`; "
             f"model {a.model}, {a.precision}, load {C.load_line()}.", "",
             f"Step time without profiler: {statistics.median(times):.2f} s (steps 3-4); with torch.profiler "
             f"{prof_step:.2f} s, ops' self CPU time {total:.2f} s ({total / prof_step:.0%} of the step, 2 threads "
             "counted once); with cProfile " f"{cprof_step:.2f} s.", "",
             C.table(["torch ops by kind", "self CPU s", "share"],
                     [[k, f"{v:.3f}", f"{v / total:.0%}"] for k, v in cats.items()]), "",
             C.table(["op", "calls", "self CPU s", "share"],
                     [[e.key, e.count, f"{e.self_cpu_time_total / 1e6:.3f}",
                       f"{e.self_cpu_time_total / 1e6 / total:.0%}"] for e in top]), "",
             C.table(["phase (cProfile, cumulative)", "s", "share of step"],
                     [[k, f"{v:.3f}", f"{v / cprof_step:.0%}"]
                      for k, v in sorted(phases.items(), key=lambda kv: -kv[1])])]
    iso, step = overheads(w.engine), statistics.median(times)
    lines += ["", f"Isolated costs, measured after the steps above (median of 3; step time {step:.2f} s):", "",
              C.table(["operation", "s", "share of a step"], [[k, f"{v:.3f}", f"{v / step:.0%}"] for k, v in iso])]
    text = "\n".join(lines)
    print(text)
    print("wrote", C.write_result(a.out or f"profile_{a.stage}", text))
    from align.engine.deepspeed_engine import teardown

    w.close()
    teardown()
    os._exit(0)


if __name__ == "__main__":
    main()
