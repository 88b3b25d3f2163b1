"""Tokenized examples -> padded torch tensors, one collator per kind.

`loss_mask[b, t] = 1` when token t is a response token (EOS included) to be scored; the
log-prob function (align.models.logprobs) does the shift. Training batches are right-padded;
generation prompts are left-padded so every row's last token sits at the end.
All integer tensors are int64; `pad_to_multiple_of` rounds T up (e.g. 8 for tensor cores).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch


def collate_rows(rows: Sequence[dict], pad_id: int):
    """Online-RL rows {"prompt": ids, "response": ids} (rlhf/ppo_workers.py) as one right-padded
    prompt+response batch: input_ids, attention_mask, loss_mask (B, T) with the response tokens
    scored, and the prompt lengths (B,) that locate each response. On the CPU."""
    examples = [{"input_ids": list(r["prompt"]) + list(r["response"]),
                 "loss_mask": [0] * len(r["prompt"]) + [1] * len(r["response"])} for r in rows]
    return collate_sft(examples, pad_id), torch.tensor([len(r["prompt"]) for r in rows])


Batch = Dict[str, torch.Tensor]


def _width(seqs: Sequence[Sequence[int]], multiple: Optional[int]) -> int:
    width = max(len(s) for s in seqs)
    if multiple:
        width = -(-width // multiple) * multiple
    return width


def pad(seqs: Sequence[Sequence[int]], value: int, width: int, left: bool = False) -> torch.Tensor:
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            row = torch.as_tensor(list(s), dtype=torch.long)
            if left:
                out[i, width - len(s):] = row
            else:
                out[i, : len(s)] = row
    return out


def _sequences(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int,
               multiple: Optional[int], prefix: str = "") -> Batch:
    """Right-padded prompt+response rows with their attention and loss masks."""
    seqs = [list(p) + list(r) for p, r in zip(prompts, responses)]
    masks = [[0] * len(p) + [1] * len(r) for p, r in zip(prompts, responses)]
    width = _width(seqs, multiple)
    return {
        f"{prefix}input_ids": pad(seqs, pad_id, width),
        f"{prefix}attention_mask": pad([[1] * len(s) for s in seqs], 0, width),
        f"{prefix}loss_mask": pad(masks, 0, width),
    }


def collate_sft(examples: List[dict], pad_id: int, pad_to_multiple_of: Optional[int] = None) -> Batch:
    """input_ids, attention_mask, loss_mask (B, T); position_ids too for packed rows."""
    seqs = [e["input_ids"] for e in examples]
    width = _width(seqs, pad_to_multiple_of)
    batch = {
        "input_ids": pad(seqs, pad_id, width),
        "attention_mask": pad([[1] * len(s) for s in seqs], 0, width),
        "loss_mask": pad([e["loss_mask"] for e in examples], 0, width),
    }
    if "position_ids" in examples[0]:
        batch["position_ids"] = pad([e["position_ids"] for e in examples], 0, width)
    return batch


def collate_pairwise(examples: List[dict], pad_id: int, pad_to_multiple_of: Optional[int] = None) -> Batch:
    """One batch for a single forward: input_ids/attention_mask/loss_mask (2B, T), rows 0..B-1
    prompt+chosen and rows B..2B-1 prompt+rejected of the same examples; prompt_lengths, margin,
    weight (B,)."""
    prompts = [e["prompt_ids"] for e in examples] * 2
    responses = [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
    batch = _sequences(prompts, responses, pad_id, pad_to_multiple_of)
    batch["prompt_lengths"] = torch.tensor([len(e["prompt_ids"]) for e in examples], dtype=torch.long)
    batch["margin"] = torch.tensor([float(e.get("margin", 0.0)) for e in examples], dtype=torch.float32)
    batch["weight"] = torch.tensor([float(e.get("weight", 1.0)) for e in examples], dtype=torch.float32)
    return batch


def collate_binary(examples: List[dict], pad_id: int, pad_to_multiple_of: Optional[int] = None,
                   max_length: Optional[int] = None) -> Batch:
    """KTO batch: (prompt_i, completion_i) rows with label (B,) bool, and the mismatched rows
    (prompt_i, completion_{(i+1) mod B}) as kl_* tensors, whose log-ratio estimates the KL term
    (Ethayarajh et al. 2024, https://arxiv.org/abs/2402.01306). With B = 1 the KL row is the
    matched one. `max_length` cuts mismatched completions to fit beside their new prompt."""
    prompts = [e["prompt_ids"] for e in examples]
    completions = [e["completion_ids"] for e in examples]
    batch = _sequences(prompts, completions, pad_id, pad_to_multiple_of)
    batch["label"] = torch.tensor([bool(e["label"]) for e in examples], dtype=torch.bool)
    shifted = completions[1:] + completions[:1]
    if max_length is not None:
        shifted = [c[: max(0, max_length - len(p))] for p, c in zip(prompts, shifted)]
    batch.update(_sequences(prompts, shifted, pad_id, pad_to_multiple_of, prefix="kl_"))
    return batch


def collate_prompts(examples: List[dict], pad_id: int, pad_to_multiple_of: Optional[int] = None) -> Batch:
    """Left-padded prompt input_ids and attention_mask (B, T), ready for `generate`."""
    seqs = [e["prompt_ids"] for e in examples]
    width = _width(seqs, pad_to_multiple_of)
    return {
        "input_ids": pad(seqs, pad_id, width, left=True),
        "attention_mask": pad([[1] * len(s) for s in seqs], 0, width, left=True),
    }


# ---------------------------------------------------------------------------------------------
# Stage-specific batches: reward model, DPO, KTO, evaluation
# ---------------------------------------------------------------------------------------------


def collate_responses(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int) -> Batch:
    """Right-padded prompt+response rows (B, T) of sampled responses, with the loss mask on the
    response tokens: for scoring samples (log-probs, reward-model scores)."""
    return _sequences(prompts, responses, pad_id, None)


def collate_scored_pairs(examples: List[dict], pad_id: int) -> Batch:
    """Reward model: `collate_pairwise` (rows 0..B-1 chosen, B..2B-1 rejected) plus each pair's
    chosen_index, rejected_index and pair_example (B,) into those rows."""
    batch = collate_pairwise(examples, pad_id)
    n = len(examples)
    batch.update(chosen_index=torch.arange(n), rejected_index=torch.arange(n, 2 * n), pair_example=torch.arange(n))
    return batch


def collate_rankings(examples: List[dict], pad_id: int) -> Batch:
    """Reward model on K-way rankings (best first): K rows per ranking; its C(K,2) pairs index
    into them, each weighted 1 / C(K,2) (InstructGPT's per-prompt weighting; the same pairs and
    weights as reward_model.loss.expand_ranking / ranking_pair_weights)."""
    rows, chosen, rejected, owner, weights = [], [], [], [], []
    for i, e in enumerate(examples):
        base, prompt, k = len(rows), list(e["prompt_ids"]), len(e["responses_ids"])
        rows += [{"input_ids": prompt + list(r), "loss_mask": [0] * len(prompt) + [1] * len(r)}
                 for r in e["responses_ids"]]
        pairs = [(better, worse) for better in range(k) for worse in range(better + 1, k)]
        for better, worse in pairs:
            chosen.append(base + better)
            rejected.append(base + worse)
            owner.append(i)
        weights += [1.0 / len(pairs)] * len(pairs)
    batch = collate_sft(rows, pad_id)
    batch.update(chosen_index=torch.tensor(chosen), rejected_index=torch.tensor(rejected),
                 pair_example=torch.tensor(owner), weight=torch.tensor(weights),
                 margin=torch.zeros(len(chosen)))
    return batch


def collate_indexed_pairs(examples: List[dict], pad_id: int) -> Batch:
    """DPO: `collate_pairwise` plus each pair's dataset `index` (B,), by which a batch finds its
    cached reference log-probs."""
    batch = collate_pairwise(examples, pad_id)
    batch["index"] = torch.tensor([e["index"] for e in examples], dtype=torch.long)
    return batch


def _kl_examples(examples: List[dict]) -> List[dict]:
    """KTO's fixed mismatched rows: each prompt with its `kl_completion_ids`."""
    return [{"prompt_ids": e["prompt_ids"], "completion_ids": e["kl_completion_ids"], "label": e["label"]}
            for e in examples]


def collate_kto(examples: List[dict], pad_id: int) -> Batch:
    """KTO: `collate_binary`'s matched rows and label, the fixed mismatched rows (the
    `kl_completion_ids` column) as kl_* tensors, and `index` (B,)."""
    batch = collate_binary(examples, pad_id)
    kl = collate_binary(_kl_examples(examples), pad_id)
    for key in ("input_ids", "attention_mask", "loss_mask"):
        batch[f"kl_{key}"] = kl[key]
    batch["index"] = torch.tensor([e["index"] for e in examples], dtype=torch.long)
    return batch


def collate_kto_reference(examples: List[dict], pad_id: int) -> Batch:
    """KTO's reference pass: one (2B, T) batch, the B matched rows then the B mismatched rows,
    and `index` (B,)."""
    batch = collate_binary(examples + _kl_examples(examples), pad_id)
    batch["index"] = torch.tensor([e["index"] for e in examples], dtype=torch.long)
    return batch


def collate_listwise(examples: List[dict], pad_id: int, k: int) -> Batch:
    """Listwise DPO on rankings (best first): k blocks of B rows in one (k*B, T) batch, block j
    holding each example's j-th response (an empty response where a ranking is shorter than k);
    `mask` (B, k) marks the responses that exist; `index` (B,); `weight` (B,) ones."""
    prompts = [e["prompt_ids"] for e in examples] * k
    responses = [e["responses_ids"][j] if j < len(e["responses_ids"]) else [] for j in range(k) for e in examples]
    batch = _sequences(prompts, responses, pad_id, None)
    batch["mask"] = torch.tensor([[j < len(e["responses_ids"]) for j in range(k)] for e in examples], dtype=torch.bool)
    batch["index"] = torch.tensor([e["index"] for e in examples], dtype=torch.long)
    batch["weight"] = torch.ones(len(examples), dtype=torch.float32)
    return batch
