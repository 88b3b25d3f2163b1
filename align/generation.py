"""Sampling responses from a policy: one function for SFT samples, PPO rollouts, online DPO
and evaluation, so every method is sampled the same way.

The engine seam: `generate_fn(input_ids, attention_mask, **kwargs)` is the deepspeed engine's
ZeRO-3-safe `generate` by default; an optional vLLM engine can provide the same call on GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch

from align.data.collate import collate_prompts
from align.models.tokenizer import stop_token_ids


@dataclass
class SamplingConfig:
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    # Greedy decoding when False (temperature and top_p are then ignored).
    do_sample: bool = True


@dataclass
class Samples:
    prompt_ids: List[List[int]]
    response_ids: List[List[int]]  # EOS included when the response ended with it
    texts: List[str]  # decoded responses, special tokens removed
    ended_with_eos: List[bool]
    # With `sample(..., with_logprobs=True)` and a sampler that returns them (align.fast_generate):
    # each response token's log-prob (R,) under the sampling distribution, and each response's
    # summed entropy; None where the sampler could not (transformers' generate).
    logprobs: Optional[List[Optional[torch.Tensor]]] = None
    entropy: Optional[List[Optional[float]]] = None


def sample(generate_fn: Callable, tokenizer, prompt_ids: Sequence[Sequence[int]], cfg: SamplingConfig,
           micro_batch_size: int = 16, seed: Optional[int] = None,
           device: Optional[torch.device] = None, with_logprobs: bool = False) -> Samples:
    """Samples one response per prompt, in micro-batches of left-padded prompts on `device`.
    `with_logprobs`: `generate_fn` takes with_logprobs=True and returns (ids, log-probs, entropies)
    (align.engine.deepspeed_engine.generate), kept per response in Samples.logprobs / .entropy."""
    if seed is not None:
        torch.manual_seed(seed)
    # The chat template's end-of-turn token and EOS both end a response (the first is listed first).
    stops, pad = stop_token_ids(tokenizer), tokenizer.pad_token_id
    responses, texts, ended, logprobs, entropy = [], [], [], [], []
    for start in range(0, len(prompt_ids), micro_batch_size):
        chunk = [{"prompt_ids": list(p)} for p in prompt_ids[start:start + micro_batch_size]]
        batch = collate_prompts(chunk, pad)
        kwargs = dict(max_new_tokens=cfg.max_new_tokens, do_sample=cfg.do_sample, eos_token_id=stops,
                      pad_token_id=pad)
        if cfg.do_sample:
            kwargs.update(temperature=cfg.temperature, top_p=cfg.top_p, top_k=0)
        if with_logprobs:
            kwargs["with_logprobs"] = True
        out = generate_fn(batch["input_ids"].to(device), batch["attention_mask"].to(device), **kwargs)
        out, logps, ents = out if with_logprobs else (out, None, None)
        width = batch["input_ids"].shape[1]
        for i, row in enumerate(out[:, width:].tolist()):
            # Tokens after EOS are padding; a row without EOS ran out of new tokens (never padded).
            end = next((t for t, token in enumerate(row) if token in stops), None)
            response = row[: end + 1] if end is not None else row
            responses.append(response)
            ended.append(end is not None)
            texts.append(tokenizer.decode(response, skip_special_tokens=True).strip())
            logprobs.append(None if logps is None else logps[i, :len(response)].float().cpu())
            entropy.append(None if ents is None else float(ents[i, :len(response)].sum()))
    if not with_logprobs:
        logprobs = entropy = None
    return Samples([list(p) for p in prompt_ids], responses, texts, ended, logprobs, entropy)


def sample_per_prompt(generate_fn: Callable, tokenizer, prompt_ids: Sequence[Sequence[int]], k: int,
                      cfg: SamplingConfig, micro_batch_size: int = 16, seed: Optional[int] = None,
                      device: Optional[torch.device] = None) -> Samples:
    """K responses per prompt (online rounds, group-relative RL): prompt i's samples are rows
    i*k .. i*k+k-1 of the result, whose `prompt_ids` repeat each prompt k times."""
    repeated = [p for p in prompt_ids for _ in range(k)]
    return sample(generate_fn, tokenizer, repeated, cfg, micro_batch_size=micro_batch_size, seed=seed, device=device)


def groups(values: Sequence, k: int) -> List[list]:
    """`values` of `sample_per_prompt`'s rows, as one list of k per prompt."""
    return [list(values[i:i + k]) for i in range(0, len(values), k)]
