"""Sampling speed: new tokens/s of transformers' `generate` against ours (align.fast_generate on
align.models.kv_decode), on the same model, prompts, sampling settings and seed, interleaved in one
process so both see the same machine load.

    .venv/bin/python benchmarks/bench_generate.py --model builtin:smollm2-135m-instruct   # ~4 min on 2 cores

Cases: `distinct` (B different prompts, a PPO rollout or an evaluation), `groups` (B/K prompts x K
samples, group-relative RL: rows i*K .. i*K+K-1 share a prompt), both in fp32 and, where the CPU
has bf16 hardware, with the model's linear layers under bf16 autocast (`deepspeed.precision: bf16`,
align.models.autocast), as the trainer runs them. Prompts: builtin:json_records eval prompts
through the model's chat template. The first repeat of each (case, path) is a warm-up (first-touch
allocation and kernel selection for new shapes) and is left out. Per path: median new tokens/s
over the rest, the share of rows whose tokens equal generate's (same seed: the same draws up to
float rounding at a draw's boundary), and the largest |log-prob - the trainer's| of our sampled
tokens (align.models.logprobs.sequence_logprobs on the prompt + response rows).
Writes benchmarks/results/<out>.{md,json}.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.common import load_line, machine, table, write_json, write_result  # noqa: E402


def left_padded(seqs, pad):
    width = max(map(len, seqs))
    ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
    return ids, mask


def responses(out, width, stops):
    rows = []
    for r in out[:, width:].tolist():
        end = next((t for t, tok in enumerate(r) if tok in stops), None)
        rows.append(r[: end + 1] if end is not None else r)
    return rows


def logprob_gap(model, prompts, rows, logps, pad):
    """max |our sampled tokens' log-probs - sequence_logprobs'| over right-padded prompt + response rows."""
    from align.models.logprobs import sequence_logprobs

    width = max(len(p) + len(r) for p, r in zip(prompts, rows))
    inp = torch.tensor([p + r + [pad] * (width - len(p) - len(r)) for p, r in zip(prompts, rows)])
    att = torch.tensor([[1] * (len(p) + len(r)) + [0] * (width - len(p) - len(r)) for p, r in zip(prompts, rows)])
    lm = torch.tensor([[0] * len(p) + [1] * len(r) + [0] * (width - len(p) - len(r)) for p, r in zip(prompts, rows)])
    with torch.no_grad():
        ref = sequence_logprobs(model, inp, att, lm).token_logps
    return max(float((logps[i, :len(r)] - ref[i, len(p):len(p) + len(r)]).abs().max())
               for i, (p, r) in enumerate(zip(prompts, rows)) if r)


def run_case(model, tokenizer, prompts, args, stops):
    from align.fast_generate import fast_generate
    from align.models.autocast import cached_casts

    pad = tokenizer.pad_token_id
    ids, mask = left_padded(prompts, pad)
    width = ids.shape[1]
    kwargs = dict(max_new_tokens=args.new_tokens, do_sample=True, temperature=args.temperature, top_p=args.top_p,
                  top_k=0, eos_token_id=stops, pad_token_id=pad)
    speeds = {"generate": [], "ours": []}
    same, gap, seconds = [], None, {"generate": [], "ours": []}
    for rep in range(args.repeats + 1):
        outs = {}
        for path in ("generate", "ours"):
            torch.manual_seed(rep)
            start = time.perf_counter()
            with torch.no_grad(), cached_casts(model):
                if path == "generate":
                    out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
                else:
                    out, logps = fast_generate(model, ids, mask, return_logprobs=True, **kwargs)
            took = time.perf_counter() - start
            rows = responses(out, width, stops)
            outs[path] = rows
            if rep > 0:  # the first repeat warms up
                speeds[path].append(sum(map(len, rows)) / took)
                seconds[path].append(took)
            if path == "ours" and rep == 1:
                gap = logprob_gap(model, prompts, rows, logps, pad)
        same.append(sum(a == b for a, b in zip(outs["generate"], outs["ours"])) / len(prompts))
    return {p: {"new_tokens_per_s": round(statistics.median(v), 1), "seconds": round(statistics.median(seconds[p]), 2),
                "runs": [round(x, 1) for x in v]} for p, v in speeds.items()} | {
        "speedup": round(statistics.median(speeds["ours"]) / statistics.median(speeds["generate"]), 3),
        "same_tokens_share": round(statistics.mean(same), 3), "max_logprob_diff": gap,
        "prompt_tokens": int(mask.sum()), "width": width}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--precisions", default="fp32,bf16", help="bf16 is skipped without bf16 hardware")
    ap.add_argument("--out", default="generate_smollm2")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.models.autocast import apply_autocast
    from align.models.sources import resolve_source
    from align.models.tokenizer import stop_token_ids
    from align.precision import describe_cpu
    from align.task.json_records import generate_task

    source = resolve_source(args.model)
    tokenizer = AutoTokenizer.from_pretrained(source)
    fp32 = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    stops = stop_token_ids(tokenizer)
    texts = [r["prompt"] for r in generate_task(0)["eval_prompts"]]
    chat = [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                          tokenize=True)["input_ids"] for t in texts[: args.batch]]
    k = args.group_size
    cases = {"distinct": chat, "groups": [p for p in chat[: args.batch // k] for _ in range(k)]}
    precisions = [p for p in args.precisions.split(",") if p == "fp32" or describe_cpu()["bf16_flags"]]
    results, rows = {}, []
    for precision in precisions:
        model = fp32
        if precision == "bf16":
            model = copy.deepcopy(fp32)
            apply_autocast(model)
        for case, prompts in cases.items():
            r = run_case(model, tokenizer, prompts, args, stops)
            results[f"{case}/{precision}"] = r
            rows.append([case, precision, r["generate"]["new_tokens_per_s"], r["ours"]["new_tokens_per_s"],
                         f"**{r['speedup']:.2f}x**", r["same_tokens_share"], f"{r['max_logprob_diff']:.1e}"])
            print(case, precision, r, flush=True)
    info = machine()
    data = {"date": datetime.date.today().isoformat(), "model": args.model, "machine": info["machine"],
            "versions": info["versions"], "load": load_line(), "args": vars(args), "results": results}
    write_json(args.out, data)
    text = (f"# Sampling: transformers `generate` vs ours ({args.model})\n\n{data['date']}; {info['machine']}; "
            f"{info['versions']}; 1-minute load at the end {data['load']}.\n\n"
            f"{args.batch} rows a call, up to {args.new_tokens} new tokens, temperature {args.temperature}, "
            f"top-p {args.top_p}, {args.threads} threads; groups = {args.batch // k} prompts x {k} samples. "
            f"Median of {args.repeats} timed repeats after one warm-up.\n\n"
            + table(["case", "linear layers", "generate new tok/s", "ours new tok/s", "ours / generate",
                     "rows equal to generate's", "max |log-prob - trainer's|"], rows) + "\n")
    print(text)
    print(write_result(args.out, text))


if __name__ == "__main__":
    main()
