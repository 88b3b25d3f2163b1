"""Peak memory of DPO steps on the real model (SmolLM2-135M-Instruct): LoRA r=16 against full
fine-tuning, through the stage's own pieces (build_causal_lm with model.lora, the DeepSpeed
engine of init_train_engine with its fused AdamW, pair_logprobs with shared prompts, dpo_loss).

4 pairs of 256 tokens (a 64-token prompt, 192-token chosen and rejected responses), fp32, one
rank (ZeRO-0), two optimizer steps: the second is the steady state, with the AdamW moments
already allocated (full fine-tuning: 2 x 513 MiB of them, LoRA: 2 x 19 MiB). The reference
log-probs are given, as the stages cache them before training (with LoRA, from the adapter-off
policy; without, from a reference model that is freed before training). Each variant runs in its
own process; RSS is sampled every 2 ms. The compared figure is the peak RSS of the process.

    python benchmarks/lora_memory.py            # the four variants; writes benchmarks/results/lora_memory.{md,json}
    python benchmarks/lora_memory.py --one lora:0   # one variant (what the table runs)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time

PAIRS, PROMPT, RESPONSE, STEPS = 4, 64, 192, 2
RANK, ALPHA = 16, 32
MIB = 1024 ** 2
# glibc raises its mmap threshold as large blocks are freed, after which freed activations stay in
# a fragmented heap and in RSS. A fixed threshold returns every block >= 128 KiB to the system when
# freed, so RSS follows the live tensors (results/lora_memory.md compares both).
MMAP_THRESHOLD = 128 * 1024
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "benchmarks", "results", "lora_memory")
sys.path.insert(0, ROOT)

from benchmarks.common import SelfPeakRSS, self_rss  # noqa: E402


def one(mode: str, checkpointing: bool) -> dict:
    import torch

    from align.config import DeepSpeedConfig, LoRAConfig, ModelConfig, OptimConfig
    from align.engine import deepspeed_engine as de
    from align.models.builders import build_causal_lm, build_tokenizer
    from align.models.logprobs import pair_logprobs
    from direct.losses import dpo_loss

    with socket.socket() as s:  # a free port for the one-rank process group
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    de.init_distributed()
    start_rss = self_rss()
    lora = LoRAConfig(r=RANK, alpha=ALPHA) if mode == "lora" else LoRAConfig()
    cfg = ModelConfig(name_or_path="builtin:smollm2-135m-instruct", gradient_checkpointing=checkpointing, lora=lora)
    model = build_causal_lm(cfg, build_tokenizer(cfg), seed=0)
    engine = de.init_train_engine(model, DeepSpeedConfig(micro_batch_size=2 * PAIRS), OptimConfig(lr=1e-5), STEPS)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(10, 49000, (PAIRS, PROMPT), generator=g)
    ids = torch.cat([torch.cat([prompt, torch.randint(10, 49000, (PAIRS, RESPONSE), generator=g)], 1)
                     for _ in range(2)])
    attn, loss_mask = torch.ones_like(ids), torch.zeros_like(ids)
    loss_mask[:, PROMPT:] = 1
    prompt_lengths = torch.full((PAIRS,), PROMPT)
    ref = torch.full((PAIRS,), -1500.0)
    losses, seconds = [], []
    with SelfPeakRSS() as memory:
        for _ in range(STEPS):
            t0 = time.perf_counter()
            lp = pair_logprobs(engine, ids, attn, loss_mask, prompt_lengths)
            loss = dpo_loss(lp.sum[:PAIRS], lp.sum[PAIRS:], ref, ref, beta=0.1)[0].mean()
            engine.backward(loss)
            de.optimizer_step(engine)
            seconds.append(time.perf_counter() - t0)
            losses.append(loss.item())
    loaded, peak = memory.start, memory.peak
    return {"mode": mode, "checkpointing": checkpointing, "trainable": trainable,
            "peak_rss_mib": peak / MIB, "loaded_rss_mib": loaded / MIB, "start_rss_mib": start_rss / MIB,
            "above_loaded_mib": (peak - loaded) / MIB, "step_s": seconds, "losses": losses,
            "rows": ids.shape[0], "T": ids.shape[1]}


def machine() -> dict:
    import torch

    flags = open("/proc/cpuinfo").read()
    cpu = next((line.split(":", 1)[1].strip() for line in flags.splitlines() if line.startswith("model name")), "?")
    return {"cpu": cpu, "bf16_hardware": "amx_bf16" in flags or "avx512_bf16" in flags, "cores": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__,
            "load_average": os.getloadavg()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--one", default=None, help="mode:checkpointing, e.g. lora:1")
    parser.add_argument("--default-malloc", dest="fixed_mmap", action="store_false",
                        help="glibc's dynamic mmap threshold (RSS then also counts freed, fragmented heap)")
    args = parser.parse_args(argv)
    if args.one:
        mode, gc = args.one.split(":")
        print("RESULT " + json.dumps(one(mode, gc == "1")), flush=True)
        return 0
    rows = []
    for variant in ("full:0", "lora:0", "full:1", "lora:1"):
        out = subprocess.run([sys.executable, __file__, "--one", variant], capture_output=True, text=True,
                             env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"),
                                      **({"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)} if args.fixed_mmap else {})))
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if not line:
            print(out.stdout[-2000:], out.stderr[-4000:], file=sys.stderr)
            return 1
        rows.append(json.loads(line[-1][7:]))
        print(rows[-1], file=sys.stderr, flush=True)
    by = {(r["mode"], r["checkpointing"]): r for r in rows}
    ratios = {f"checkpointing_{'on' if gc else 'off'}": {
        "peak_rss": by["lora", gc]["peak_rss_mib"] / by["full", gc]["peak_rss_mib"],
        "above_loaded": by["lora", gc]["above_loaded_mib"] / by["full", gc]["above_loaded_mib"]}
        for gc in (False, True)}
    result = {"machine": machine(), "malloc_mmap_threshold": MMAP_THRESHOLD if args.fixed_mmap else "glibc default",
              "pairs": PAIRS, "prompt": PROMPT, "response": RESPONSE, "steps": STEPS,
              "lora": {"r": RANK, "alpha": ALPHA, "target_modules": "all-linear"}, "rows": rows, "ratios": ratios}
    with open(OUT + ".json", "w") as fh:
        json.dump(result, fh, indent=1)
    lines = [
        "# Peak memory of a DPO step: LoRA r=16 against full fine-tuning (SmolLM2-135M-Instruct)",
        "",
        f"`python benchmarks/lora_memory.py`: {PAIRS} pairs of {PROMPT + RESPONSE} tokens (prompt {PROMPT}, responses "
        f"{RESPONSE}), fp32, one ZeRO-0 rank, fused AdamW, {STEPS} optimizer steps (the second with the AdamW state "
        "allocated), reference log-probs given (both modes cache them). Peak RSS of the training process "
        "(sampled every 2 ms), the figure compared; 'above loaded' subtracts the RSS after the model and the engine "
        "were built, when the safetensors weights are still mostly unread (mapped, not resident), so it also counts "
        "the 513 MiB of weights paged in by the first forward. glibc's mmap threshold: "
        f"{result['malloc_mmap_threshold']} (MALLOC_MMAP_THRESHOLD_).",
        "",
        f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, bf16 hardware: "
        f"{result['machine']['bf16_hardware']}, torch {result['machine']['torch']}, load average at the end "
        f"{', '.join(f'{x:.1f}' for x in result['machine']['load_average'])}.",
        "",
        "| training | checkpointing | trainable params | peak RSS (MiB) | above loaded (MiB) | step s (1, 2) | losses |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {'LoRA r=16' if r['mode'] == 'lora' else 'full'} | {'on' if r['checkpointing'] else 'off'} "
                     f"| {r['trainable']:,} | {r['peak_rss_mib']:.0f} | {r['above_loaded_mib']:.0f} "
                     f"| {', '.join(f'{s:.1f}' for s in r['step_s'])} | {', '.join(f'{x:.6f}' for x in r['losses'])} |")
    lines += ["", "LoRA / full:", ""]
    lines += [f"- {k.replace('_', ' ')}: peak RSS {v['peak_rss']:.2f}x, above loaded {v['above_loaded']:.2f}x"
              for k, v in ratios.items()]
    with open(OUT + ".md", "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    raise SystemExit(main())
