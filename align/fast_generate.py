"""Sampling behind the `generate_fn` seam of align/generation.py, with exactly generate's
distribution (the same seed gives the same tokens up to float rounding at a draw's boundary).
align.engine.deepspeed_engine.generate uses it by default outside ZeRO-3.

    generate_fn = fast_generate_fn(model)
    samples = align.generation.sample(generate_fn, tokenizer, prompt_ids, sampling_cfg)

What it does differently from `generate`:
  - decoding runs on align.models.kv_decode.KVDecoder: one preallocated K/V buffer per layer,
    written in place, and identical prompt rows (the K samples of a prompt) prefilled once;
  - top-p sampling finds the nucleus among the `candidates` most likely tokens (a top-k, no
    full-vocabulary sort), falling back to the full sort for a row whose candidates hold less
    than top_p mass;
  - the loop stops when every row has produced one of the stop tokens;
  - it can return the sampled tokens' log-probs, so a rollout need not recompute them.
Speed (benchmarks/bench_generate.py, results/generate_smollm2.md): on SmolLM2-135M at batch 32 the
fp32 decode step is bound by reading the weights (the 49k x 576 LM head alone is 12 ms of it) and
the prompt pass by the fp32 matmul peak, so most of the gain comes from sharing the prompt pass
within groups and from bf16 linear layers.

Distribution: temperature, then top-p (the nucleus: the smallest set of most likely tokens
whose probability reaches top_p, renormalised; transformers' TopPLogitsWarper), then one
multinomial draw per row over the vocabulary, as `generate` draws: with the same torch seed the
two give the same tokens (up to float rounding at a draw's boundary). top_k is not supported
(0, as align.generation passes). Rows are left-padded prompts; positions count real tokens
only, as `generate` and the trainer's right-padded forwards do. `return_logprobs=True` also
returns log p_T(token) of every sampled token under the temperature-scaled, unfiltered
distribution: the trainer's convention (align.models.logprobs with `temperature`), so PPO can
reuse them as old log-probs.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple, Union

import torch

from align.models.autocast import cached_casts
from align.models.kv_decode import KVDecoder


def _wide(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (bf16 logits are sampled in fp32; fp64 stays fp64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def nucleus_probs(logits: torch.Tensor, top_p: float, candidates: int = 256) -> Tuple[torch.Tensor, torch.Tensor]:
    """The top-p distribution of each row of `logits` (B, V) over its `candidates` most likely tokens.

    Returns (probs (B, C), token ids (B, C)); probs are 0 outside the nucleus and each row sums
    to 1. A token is kept when the probability mass of the tokens ranked above it is < top_p (so
    the most likely token is always kept). C = min(candidates, V); a row whose C candidates hold
    less than top_p mass gets C = V (a full sort) so the result is exact.
    """
    probs = torch.softmax(_wide(logits), dim=-1)
    k = min(candidates, probs.shape[-1])
    vals, idx = probs.topk(k, dim=-1)  # sorted, most likely first
    if k < probs.shape[-1] and bool((vals.sum(-1) < top_p).any()):
        vals, idx = probs.sort(dim=-1, descending=True)
    mass_before = vals.cumsum(-1) - vals
    kept = torch.where(mass_before < top_p, vals, torch.zeros_like(vals))
    return kept / kept.sum(-1, keepdim=True), idx


def sample_next(logits: torch.Tensor, do_sample: bool = True, temperature: float = 1.0, top_p: float = 1.0,
                generator: Optional[torch.Generator] = None, candidates: int = 256) -> torch.Tensor:
    """One token per row from next-token logits (B, V): argmax, or temperature + top-p sampling."""
    if not do_sample:
        return logits.argmax(-1)
    scaled = _wide(logits) / temperature if temperature != 1.0 else _wide(logits)
    if top_p >= 1.0:
        return torch.multinomial(torch.softmax(scaled, -1), 1, generator=generator).squeeze(1)
    probs, idx = nucleus_probs(scaled, top_p, candidates)
    # One draw over the whole vocabulary, as generate makes it: the same seed gives the same tokens.
    full = torch.zeros_like(scaled).scatter_(1, idx, probs)
    return torch.multinomial(full, 1, generator=generator).squeeze(1)


@torch.no_grad()
def fast_generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                  do_sample: bool = True, temperature: float = 1.0, top_p: float = 1.0, top_k: Optional[int] = 0,
                  eos_token_id: Union[int, Sequence[int], None] = None, pad_token_id: Optional[int] = None,
                  generator: Optional[torch.Generator] = None, return_logprobs: bool = False,
                  candidates: int = 256,
                  return_entropy: bool = False) -> Union[torch.Tensor, Tuple[torch.Tensor, ...]]:
    """Samples up to `max_new_tokens` per row of left-padded prompts.

    input_ids, attention_mask: (B, P). Returns (B, P + N) ids, prompt then new tokens (pad after
    a row's EOS; N <= max_new_tokens, fewer when every row ended), like `generate`; with
    `return_logprobs`, also (B, N) log-probs of the new tokens (0 after EOS); with `return_entropy`
    as well, then (B, N) entropies of the distributions they were drawn from (same convention).
    `eos_token_id`: one id or several (any of them ends a row). An architecture
    align.models.kv_decode does not handle is sampled by the model's own `generate` (without
    log-probs).
    """
    if top_k not in (None, 0):
        raise ValueError("fast_generate does not implement top_k; use top_p")
    if eos_token_id is None or pad_token_id is None:
        raise ValueError("fast_generate needs eos_token_id and pad_token_id")
    decoder = KVDecoder.for_model(model, input_ids.shape[1] + max_new_tokens)
    if decoder is None:
        if return_logprobs:
            raise ValueError(f"fast_generate: no log-probs for {type(model).__name__}; it samples with generate")
        kwargs = dict(temperature=temperature, top_p=top_p, top_k=0) if do_sample else {}
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                              do_sample=do_sample, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                              **kwargs)
    stops = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id),
                         device=input_ids.device)
    with cached_casts(model):
        return _decode(decoder, input_ids, attention_mask, max_new_tokens, do_sample, temperature, top_p, stops,
                       pad_token_id, generator, return_logprobs, candidates, return_entropy)


def _decode(decoder, input_ids, attention_mask, max_new_tokens, do_sample, temperature, top_p, stops, pad_token_id,
            generator, return_logprobs, candidates, return_entropy=False):
    batch = input_ids.shape[0]
    logits = decoder.start(input_ids, attention_mask, max_new_tokens)
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    tokens, logps, entropies = [], [], []
    for step in range(max_new_tokens):
        token = sample_next(logits, do_sample, temperature, top_p, generator, candidates)
        token = torch.where(finished, torch.full_like(token, pad_token_id), token)
        if return_logprobs:
            # float32 as the trainer's gather_logprobs computes them, so the two agree to rounding
            scaled = logits.float() / temperature if do_sample and temperature != 1.0 else logits.float()
            lp = scaled.gather(1, token[:, None]).squeeze(1) - torch.logsumexp(scaled, -1)
            logps.append(torch.where(finished, torch.zeros_like(lp), lp))
            if return_entropy:
                log_p = torch.log_softmax(scaled, -1)
                ent = -(log_p.exp() * log_p).sum(-1)
                entropies.append(torch.where(finished, torch.zeros_like(ent), ent))
        tokens.append(token)
        finished |= torch.isin(token, stops)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        logits = decoder.step(token)
    ids = torch.cat([input_ids, torch.stack(tokens, 1)], 1)
    if not return_logprobs:
        return ids
    return (ids, torch.stack(logps, 1), torch.stack(entropies, 1)) if return_entropy else (ids, torch.stack(logps, 1))


def fast_generate_fn(model, generator: Optional[torch.Generator] = None, candidates: int = 256) -> Callable:
    """`generate_fn(input_ids, attention_mask, **generate_kwargs)` for align.generation.sample."""

    def generate_fn(input_ids, attention_mask, **kwargs):
        return fast_generate(model, input_ids, attention_mask, generator=generator, candidates=candidates, **kwargs)

    return generate_fn
