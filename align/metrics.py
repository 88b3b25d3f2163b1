"""The one metric reducer of the training stages: global weighted means over the whole global
batch (all micro-batches of all ranks) with one all-reduce, so a logged metric never depends on
how the batch was split; and the one token count (`train_tokens`). Imports only torch."""

from __future__ import annotations

from typing import Callable, Dict, Mapping

import torch

# The attention masks of the sequences a training micro-batch forwards: its rows, and KTO's
# mismatched (KL) rows.
_SEQUENCE_MASKS = ("attention_mask", "kl_attention_mask")


def train_tokens(batch: Mapping[str, torch.Tensor]) -> float:
    """`tokens`, the one token count of every stage (SFT, reward model, DPO family, KTO, PPO/GRPO),
    of their `tokens_per_s` and of the cost ledger's `train_tokens`: the non-padding tokens,
    prompt and response, of every sequence a training step forwards through the trained model,
    i.e. the sum of a collated micro-batch's attention masks (this rank's; stages all-reduce it).

    A pair's shared prompt counts once per sequence (twice: prompt+chosen, prompt+rejected), also
    when the padding-free forward computes it once: the count does not depend on execution
    options, so tokens/s shows their speed-up (README, "Tokens and tokens/s").
    """
    return float(sum(float(batch[k].sum()) for k in _SEQUENCE_MASKS if k in batch))


class Means:
    """Global weighted means (and plain sums) of per-example values: local sums over
    micro-batches, then one all-reduce in `reduce`.

    Every rank must add the same names (use zero weights for "none here"); a mean whose global
    weight is 0 is left out of the result. `dtype` is the accumulation type (the reward model
    accumulates in float64, the direct stages in float32).
    """

    def __init__(self, dtype: torch.dtype = torch.float32):
        self.dtype = dtype
        self.sums: Dict[str, torch.Tensor] = {}
        self.weights: Dict[str, torch.Tensor] = {}
        self.totals: Dict[str, torch.Tensor] = {}

    def add(self, name: str, values: torch.Tensor, weights: torch.Tensor) -> None:
        """Adds sum(values * weights) and sum(weights) to the mean `name`."""
        values = values.detach().to(self.dtype).reshape(-1)
        weights = weights.detach().to(self.dtype).reshape(-1)
        self.add_sums(name, (values * weights).sum(), weights.sum())

    def add_sums(self, name: str, weighted_sum: torch.Tensor, weight: torch.Tensor) -> None:
        """Adds an already summed numerator and denominator to the mean `name`."""
        self.sums[name] = self.sums.get(name, 0.0) + weighted_sum.detach().to(self.dtype)
        self.weights[name] = self.weights.get(name, 0.0) + weight.detach().to(self.dtype)

    def add_total(self, name: str, value) -> None:
        """Adds to the plain global sum `name` (token counts, pair counts)."""
        self.totals[name] = self.totals.get(name, 0.0) + torch.as_tensor(value).detach().to(self.dtype)

    def reduce(self, all_reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> Dict[str, float]:
        """{name: global mean} for the means, then {name: global sum} for the totals."""
        names, totals = sorted(self.sums), sorted(self.totals)
        if not names and not totals:
            return {}
        parts = [self.sums[n] for n in names] + [self.weights[n] for n in names] + [self.totals[n] for n in totals]
        reduced = all_reduce_sum(torch.stack([torch.as_tensor(p, dtype=self.dtype) for p in parts]))
        k = len(names)
        out = {n: (reduced[i] / reduced[k + i]).item() for i, n in enumerate(names) if reduced[k + i] > 0}
        out.update({n: reduced[2 * k + i].item() for i, n in enumerate(totals)})
        return out
