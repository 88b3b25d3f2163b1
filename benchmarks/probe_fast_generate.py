"""Probe: new tokens/s of plain `generate` against align.fast_generate on SmolLM2-135M-Instruct
(fp32, CPU), the same prompts (builtin:json_records eval prompts, chat template), sampling
settings and seed, interleaved in one process so both see the same machine load.

    python benchmarks/probe_fast_generate.py MODEL_DIR [--batches 8 32] [--new-tokens 48] [--threads 2]

MODEL_DIR: a plain (safetensors) copy of the model, see /work/shared/ENVIRONMENT.md. Prints one
JSON line per run and, for the fast path, the largest |log-prob - sequence_logprobs| of its tokens.
"""

import argparse
import json
import platform
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from align.fast_generate import fast_generate
from align.models.logprobs import sequence_logprobs
from align.task.json_records import generate_task, gold_score


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    prompts = [r["prompt"] for r in generate_task(0)["eval_prompts"]]
    enc = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                   tokenize=True)["input_ids"] for p in prompts[: max(args.batches)]]
    eos, pad = tok.eos_token_id, tok.pad_token_id
    print(json.dumps({"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                      "prompt_tokens_mean": sum(map(len, enc)) / len(enc)}))
    kwargs = dict(max_new_tokens=args.new_tokens, do_sample=True, temperature=args.temperature, top_p=args.top_p,
                  top_k=0, eos_token_id=eos, pad_token_id=pad)
    for bs in args.batches:
        seqs = enc[:bs]
        width = max(map(len, seqs))
        ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs])
        att = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
        for rep in range(args.repeats):
            for name in ("generate", "fast"):
                torch.manual_seed(rep)
                start = time.perf_counter()
                with torch.no_grad():
                    if name == "generate":
                        out = model.generate(input_ids=ids, attention_mask=att, **kwargs)
                    else:
                        out, logps = fast_generate(model, ids, att, return_logprobs=True, **kwargs)
                seconds = time.perf_counter() - start
                new = out[:, width:].tolist()
                real = [r[: r.index(eos) + 1] if eos in r else r for r in new]
                texts = [tok.decode(r, skip_special_tokens=True).strip() for r in real]
                gold = [gold_score(p, t) for p, t in zip(prompts, texts)]
                row = {"batch": bs, "path": name, "seconds": round(seconds, 2), "steps": len(new[0]),
                       "new_tokens": sum(map(len, real)), "new_tokens_per_s": round(sum(map(len, real)) / seconds, 2),
                       "parses": sum(g > -1 for g in gold), "exact": sum(g == 1 for g in gold)}
                if name == "fast" and rep == 0:
                    row["max_logprob_diff"] = logprob_gap(model, seqs, real, logps, pad)
                print(json.dumps(row), flush=True)


def logprob_gap(model, prompts, responses, logps, pad):
    """max |fast path's log-prob - sequence_logprobs| over the sampled tokens (right-padded rows)."""
    width = max(len(p) + len(r) for p, r in zip(prompts, responses))
    inp = torch.tensor([p + r + [pad] * (width - len(p) - len(r)) for p, r in zip(prompts, responses)])
    rows = list(zip(prompts, responses))
    att = torch.tensor([[1] * (len(p) + len(r)) + [0] * (width - len(p) - len(r)) for p, r in rows])
    lm = torch.tensor([[0] * len(p) + [1] * len(r) + [0] * (width - len(p) - len(r)) for p, r in rows])
    with torch.no_grad():
        ref = sequence_logprobs(model, inp, att, lm).token_logps
    return max(float((logps[i, :len(r)] - ref[i, len(p):len(p) + len(r)]).abs().max())
               for i, (p, r) in enumerate(zip(prompts, responses)) if r)


if __name__ == "__main__":
    main()
