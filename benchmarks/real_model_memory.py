"""Peak memory of one DPO-style forward + backward on the real model (SmolLM2-135M-Instruct).

4 pairs of 512 tokens (a 128-token prompt, 384-token chosen and rejected responses: 8 rows of
512 tokens), the sigmoid DPO loss of the summed response log-probs (reference log-probs fixed at
0, which changes no memory), in train mode. Variants, each in its own process:

- head: `full` (the log-prob function before issue 14: logits at every position, (8, 512, 49,152)
  fp32 = 768 MiB, then its logsumexp and gradient) or `chunked` (the LM head at response
  positions only, in chunks recomputed in backward; align.models.logprobs today);
- gradient checkpointing off or on (model.gradient_checkpointing);
- `heap`: `model.return_freed_memory=false`, glibc's default dynamic mmap threshold, which keeps
  freed blocks below 32 MiB in the heap (what every run did before this option).

Peak = the highest RSS sampled every 2 ms during the step, minus the RSS with the model loaded
and its weights read once (513 MiB fp32; `from_pretrained` maps the safetensors file lazily, so
without that read the first forward's page-ins would count as step memory). The delta includes
the parameters' gradients (513 MiB); the "rest" column subtracts them. CPU s = user + system
time of the process during the step (less sensitive than wall time to other jobs; system time is
mostly page faults). Usage:

    python benchmarks/real_model_memory.py            # every variant, a table on stdout
    python benchmarks/real_model_memory.py --one chunked:1   # one variant (what the table runs)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import SelfPeakRSS  # noqa: E402

PAIRS, PROMPT, RESPONSE = 4, 128, 384
MIB = 1024 ** 2


def cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def one(head: str, checkpointing: bool, heap: bool = False) -> dict:
    import torch

    from align.config import ModelConfig
    from align.models.builders import build_causal_lm, build_tokenizer
    from align.models.logprobs import sequence_logprobs

    torch.manual_seed(0)
    cfg = ModelConfig(name_or_path="builtin:smollm2-135m-instruct", gradient_checkpointing=checkpointing,
                      padding_free=False, return_freed_memory=not heap)
    model = build_causal_lm(cfg, build_tokenizer(cfg)).train()
    with torch.no_grad():  # page the lazily mapped weights in, as any run's first forward does
        for p in model.parameters():
            p.sum()
    T = PROMPT + RESPONSE
    prompt = torch.randint(10, 49000, (PAIRS, PROMPT))
    ids = torch.cat([torch.cat([prompt, torch.randint(10, 49000, (PAIRS, RESPONSE))], 1) for _ in range(2)])
    attn = torch.ones_like(ids)
    loss_mask = torch.zeros_like(ids)
    loss_mask[:, PROMPT:] = 1
    grads = sum(p.numel() * p.element_size() for p in model.parameters())
    with SelfPeakRSS() as memory:
        start, cpu = time.perf_counter(), cpu_seconds()
        lp = sequence_logprobs(model, ids, attn, loss_mask, keep_logits=(head == "full"))
        chosen, rejected = lp.sum[:PAIRS], lp.sum[PAIRS:]
        loss = -torch.nn.functional.logsigmoid(0.1 * (chosen - rejected)).mean()
        loss.backward()
        seconds, (user, system) = time.perf_counter() - start, (b - a for a, b in zip(cpu, cpu_seconds()))
    return {"head": head, "checkpointing": checkpointing, "heap": heap, "peak_mib": (memory.peak - memory.start) / MIB,
            "grads_mib": grads / MIB, "seconds": seconds, "user_s": user, "sys_s": system, "loss": loss.item(), "rows": ids.shape[0],
            "T": T}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--one", default=None, help="head:checkpointing[:heap], e.g. chunked:1")
    parser.add_argument("--variants", default="chunked:1,chunked:1:heap,full:1,chunked:0,full:0")
    args = parser.parse_args(argv)
    if args.one:
        head, gc, *heap = args.one.split(":")
        print("RESULT " + json.dumps(one(head, gc == "1", heap == ["heap"])), flush=True)
        return 0
    rows = []
    for variant in args.variants.split(","):
        out = subprocess.run([sys.executable, __file__, "--one", variant], capture_output=True, text=True,
                             env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2")))
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if not line:
            print(out.stderr[-2000:], file=sys.stderr)
            return 1
        rows.append(json.loads(line[-1][7:]))
        print(rows[-1], file=sys.stderr, flush=True)
    print("| LM head | checkpointing | freed memory | peak above loaded model (MiB) | of which gradients | rest (MiB) "
          "| step s | CPU s (user + system) | loss |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['head']} | {'on' if r['checkpointing'] else 'off'} | {'kept in heap' if r['heap'] else 'returned'} "
              f"| {r['peak_mib']:.0f} | {r['grads_mib']:.0f} | {r['peak_mib'] - r['grads_mib']:.0f} "
              f"| {r['seconds']:.1f} | {r['user_s']:.1f} + {r['sys_s']:.1f} | {r['loss']:.6f} |")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    raise SystemExit(main())
