"""Per-rank workers of the PPO stage, one class per model group (built on every rank of the
group's Ray actors by ActorGroup; the driver side is rlhf/rollout.py).

    PolicyWorker     trained causal LM: rollouts, old log-probs and entropy, clipped policy update
    ValueWorker      trained scalar model (initialised from the reward model): values, value update;
                     with LoRA, adapters plus the full score head, and when it starts from the
                     reward model it also serves the reward with its adapters off (no reward group)
    ReferenceWorker  frozen SFT model: reference log-probs (not started with LoRA: the policy
                     serves them with its adapter off, PolicyWorker.ref_logprobs)
    RewardWorker     frozen reward model: normalised scores of whole responses

Rows travel between groups through the driver as dicts of token ids, {"prompt": [...],
"response": [...]}, plus per-token tensors over the response for training (old log-probs,
advantages, values, returns). A rank packs its rows right-padded, prompt then response, so
response token t of a row with a P-token prompt sits at position P + t: its log-prob is read
there and its value V(s_t), the state before it, at P + t - 1. Every method returns one entry per
row in the order given. All ranks of a group get equally many rows, so under ZeRO-3 they run the
same number of forwards.
"""

from __future__ import annotations

import math
import os
from contextlib import nullcontext
from dataclasses import replace
from functools import partial
from typing import Any, Dict, List, Optional, Sequence

import torch

from align.config import ConfigError, LoRAConfig
from align.data.batching import BatchIterator
from align.data.collate import collate_rows
from align.engine import deepspeed_engine as de
from align.evaluation import sample_and_score
from align.generation import sample
from align.models.builders import build_causal_lm, build_scalar_model, build_tokenizer, last_token_index, token_scalars
from align.models.logprobs import sequence_logprobs
from align.models.lora import as_reference, is_lora
from align.stage import load_tokenized
from reward_model.loss import reward_normalization
from rlhf.policy_loss import clipped_policy_loss, kl_loss
from rlhf.ppo_math import entropy_from_logits, policy_loss, value_loss

Row = Dict[str, Any]


# ---------------------------------------------------------------------------------------------
# Helpers shared by the workers
# ---------------------------------------------------------------------------------------------


def group_deepspeed(cfg, group, trained: bool, grad_accum_steps: int = 1):
    """The stage's DeepSpeed settings with this group's ZeRO stage and offload."""
    return replace(cfg.deepspeed, zero_stage=group.zero_stage, grad_accum_steps=grad_accum_steps,
                   offload_optimizer=group.offload and trained and group.zero_stage > 0,
                   offload_params=group.offload and group.zero_stage == 3)


def collate_on_device(rows: Sequence[Row], pad_id: int):
    """`collate_rows` (batch (B, T) and prompt lengths (B,)) on this rank's device."""
    batch, prompt_lens = collate_rows(rows, pad_id)
    return de.to_device(batch), prompt_lens.to(de.device())


def response_view(x: torch.Tensor, prompt_lens: torch.Tensor, width: int, offset: int = 0) -> torch.Tensor:
    """(B, width) values of per-position `x` (B, T) at positions P_i + t + offset, t < width.

    Positions past a row's end read clamped garbage: multiply by the response mask.
    """
    idx = prompt_lens[:, None] + offset + torch.arange(width, device=x.device)[None, :]
    return x.gather(1, idx.clamp(0, x.shape[1] - 1))


def response_mask(rows: Sequence[Row], device=None) -> torch.Tensor:
    lengths = torch.tensor([len(r["response"]) for r in rows], device=device)
    return (torch.arange(int(lengths.max()), device=device)[None, :] < lengths[:, None]).float()


def pad_right(seqs: Sequence[torch.Tensor], width: Optional[int] = None, device=None) -> torch.Tensor:
    """(B, width) float rows, zero-padded on the right; width defaults to the longest row."""
    out = torch.zeros(len(seqs), width or max(len(s) for s in seqs), device=device)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out


def chunks(rows: Sequence[Row], size: int) -> List[Sequence[Row]]:
    return [rows[i:i + size] for i in range(0, len(rows), size)]


class TokenScalars(torch.nn.Module):
    """A scalar model's per-token outputs (B, T) as the module's forward.

    Wrapping `token_scalars` makes the value and reward forwards go through the DeepSpeed
    engine's forward, which ZeRO needs for its backward bookkeeping.
    """

    def __init__(self, model: torch.nn.Module, padding_free: bool = False):
        super().__init__()
        self.model, self.padding_free = model, padding_free

    def forward(self, input_ids, attention_mask):
        return token_scalars(self.model, input_ids, attention_mask, padding_free=self.padding_free)


def _sum_stats(total: Dict[str, float], stats: Dict[str, torch.Tensor], weight: float) -> None:
    for key, value in stats.items():
        total[key] = total.get(key, 0.0) + float(value) * weight


# ---------------------------------------------------------------------------------------------
# Trained workers
# ---------------------------------------------------------------------------------------------


def _grad_accum(cfg, num_actors: int) -> int:
    """Micro-batches per rank per minibatch: the engine's gradient-accumulation steps."""
    per_rank = cfg.rollout_batch_size // cfg.num_minibatches // num_actors
    return max(1, math.ceil(per_rank / cfg.deepspeed.micro_batch_size))


def _optimizer_steps(cfg) -> int:
    return max(1, cfg.train.max_steps) * cfg.ppo_epochs * cfg.num_minibatches


class PolicyWorker:
    """One rank of the policy: samples rollouts and takes clipped-surrogate PPO steps."""

    def __init__(self, cfg):
        self.cfg, self.de = cfg, de
        de.seed_everything(cfg.seed)
        self.tokenizer = build_tokenizer(cfg.model)
        train, self.eval_rows, self.report = load_tokenized(cfg.data, "prompt", self.tokenizer, cfg.seed)
        if cfg.eval_prompts and self.eval_rows is None:
            raise ConfigError("eval_prompts: needs held-out prompts (data.eval or data.eval_fraction); or set it to 0")
        # Global batch b holds the same prompts whatever the number of ranks; K responses each.
        self.batches = BatchIterator(train, cfg.rollout_batch_size // cfg.rollout.group_size // de.world_size(),
                                     cfg.seed, de.rank(), de.world_size())
        self.data_iter = iter(self.batches)
        self.gas = _grad_accum(cfg, de.world_size())
        model = build_causal_lm(cfg.model, self.tokenizer, seed=cfg.seed)
        ds = group_deepspeed(cfg, cfg.policy, trained=True, grad_accum_steps=self.gas)
        self.engine = de.init_train_engine(model, ds, cfg.optim, _optimizer_steps(cfg))
        # The generation seam: an optional vLLM engine would provide this same call.
        self.generate_fn = partial(de.generate, self.engine, backend=cfg.generation_backend)
        self.ref_engine = (build_reference_engine(cfg, self.tokenizer)
                           if cfg.reference_on_policy and not cfg.adapter_reference else None)
        self.reward_scorer = (RewardScorer(cfg, self.tokenizer)
                              if cfg.reward_on_policy and cfg.uses_reward_model else None)
        self.step, self.driver_state = 0, {}
        state = de.load_checkpoint(self.engine, self._ckpt_dir()) if cfg.train.resume else None
        if state is not None:
            self.step, self.driver_state = state["step"], state["driver"]
            self.batches.load_state_dict(state["data"])
            self.data_iter = iter(self.batches)

    def _ckpt_dir(self) -> str:
        return os.path.join(self.cfg.run_dir, "checkpoints", "policy")

    def plan(self) -> Dict[str, Any]:
        return {"start_step": self.step, "driver_state": self.driver_state, "prompts": len(self.batches.dataset),
                "data_report": dict(self.report)}

    def _sample(self, rows: Sequence[Row], sampling, seed: int, with_logprobs: bool = False) -> Dict[str, list]:
        """Samples one response per data row; prompt_text and extras are the rows' own (the gold
        scorer and the reward functions read the text as written, not the chat-templated one)."""
        prompts = [e["prompt_ids"] for e in rows]
        # Under ZeRO-3, gathering the weights once beats gathering them at every decoding step.
        gather = self.de.gathered_parameters(self.engine) if self.cfg.gather_for_generation else nullcontext()
        with gather:
            out = sample(self.generate_fn, self.tokenizer, prompts, sampling,
                         micro_batch_size=self.cfg.generation_batch_size, seed=seed, device=self.de.device(),
                         with_logprobs=with_logprobs)
        result = {"prompt": out.prompt_ids, "response": out.response_ids, "eos": out.ended_with_eos,
                  "text": out.texts, "prompt_text": [e["prompt_text"] for e in rows],
                  "extras": [e.get("extras") or "" for e in rows]}
        if with_logprobs:
            result.update(sampler_logprobs=out.logprobs, sampler_entropy=out.entropy)
        return result

    def rollout(self, step: int) -> Dict[str, list]:
        """Samples rollout.group_size responses for each of this rank's prompts of PPO step `step`
        (prompt-major: the K samples of a prompt are consecutive rows, one group)."""
        k = self.cfg.rollout.group_size
        batch = [e for e in next(self.data_iter) for _ in range(k)]
        return self._sample(batch, self.cfg.sampling, seed=self.cfg.seed + 7919 * step + self.de.rank(),
                            with_logprobs=self.cfg.rollout.logprobs_from_sampler)

    def eval_rollout(self, num_prompts: int) -> Dict[str, list]:
        """Samples the first `num_prompts` eval prompts (this rank's contiguous share, padded to
        equal counts with copies of prompt 0) with the fixed eval settings and seed."""
        n, world = min(num_prompts, len(self.eval_rows)), self.de.world_size()
        per_rank = math.ceil(n / world)
        idx = [i if i < n else 0 for i in range(self.de.rank() * per_rank, (self.de.rank() + 1) * per_rank)]
        rows = [self.eval_rows[i] for i in idx]
        # The held-out sampling-and-scoring helper every stage uses; the driver adds KL and CIs.
        gather = self.de.gathered_parameters(self.engine) if self.cfg.gather_for_generation else nullcontext()
        with gather:
            scored = sample_and_score(self.generate_fn, self.tokenizer, [r["prompt_ids"] for r in rows],
                                      [r["prompt_text"] for r in rows], self.cfg.eval_sampling,
                                      seed=self.cfg.seed + 104729 + self.de.rank(),
                                      task_paths=[s.path for s in self.cfg.data.train],
                                      micro_batch_size=self.cfg.generation_batch_size, device=self.de.device())
        out = scored.samples
        real = sum(1 for i in range(self.de.rank() * per_rank, (self.de.rank() + 1) * per_rank) if i < n)
        result = {"prompt": out.prompt_ids, "response": out.response_ids, "eos": out.ended_with_eos,
                  "text": out.texts, "prompt_text": [r["prompt_text"] for r in rows]}
        if scored.gold is not None:
            result["gold"] = scored.gold
        return {k: v[:real] for k, v in result.items()}

    @torch.no_grad()
    def logprobs(self, rows: Sequence[Row], entropy: bool = False, temperature: Optional[float] = None):
        """Per-row response log-probs (R,) under the current policy, and the summed entropy."""
        return _logprobs(self.engine, rows, self.tokenizer.pad_token_id, self.cfg, entropy, temperature)

    @torch.no_grad()
    def ref_logprobs(self, rows: Sequence[Row], temperature: Optional[float] = None):
        """The reference's log-probs served by this rank, so no reference group is needed: from
        its reference copy (reference_on_policy), or with LoRA from this policy with its adapter
        off (the base model exactly)."""
        if self.ref_engine is not None:
            return _logprobs(self.ref_engine, rows, self.tokenizer.pad_token_id, self.cfg, temperature=temperature)
        assert is_lora(self.engine), "ref_logprobs: the policy has no adapter (use the reference group)"
        with as_reference(self.engine):
            return _logprobs(self.engine, rows, self.tokenizer.pad_token_id, self.cfg, temperature=temperature)

    def reward_scores(self, rows: Sequence[Row]) -> List[float]:
        """The frozen reward model's normalised scores, from this rank's copy (reward_on_policy)."""
        return self.reward_scorer.scores(rows)

    def train_minibatch(self, rows: Sequence[Row], num_tokens: float) -> Dict[str, Dict[str, float]]:
        """One optimizer step on this rank's share of a minibatch (gradient accumulation over
        micro-batches). `num_tokens` is the minibatch's response-token count over ALL ranks, so
        each micro-batch's loss is its share of one global token mean. Returns {"sums": the loss
        and token-weighted stats summed over micro-batches, "last": the step's lr and grad_norm}."""
        cfg, engine = self.cfg, self.engine
        # policy_loss already divides by the global token count (num_tokens), so the count here
        # is 1: what remains is undoing DeepSpeed's accumulation and rank averaging.
        scale = self.de.loss_scale(1.0, self.gas)
        totals: Dict[str, float] = {"loss": 0.0}
        micro = chunks(rows, cfg.deepspeed.micro_batch_size)
        assert len(micro) == self.gas, f"{len(micro)} micro-batches, engine expects {self.gas}"
        for part in micro:
            batch, plens = collate_on_device(part, self.tokenizer.pad_token_id)
            mask = response_mask(part, plens.device)
            lp = sequence_logprobs(engine, batch["input_ids"], batch["attention_mask"], batch["loss_mask"],
                                   temperature=cfg.sampling.temperature, padding_free=cfg.model.padding_free)
            new = response_view(lp.token_logps, plens, mask.shape[1])
            old = pad_right([r["old_logprobs"] for r in part], mask.shape[1], mask.device)
            adv = pad_right([r["advantages"] for r in part], mask.shape[1], mask.device)
            clip_low = cfg.loss.clip_low if cfg.loss.clip_low is not None else cfg.clip_range
            if cfg.aggregation == "token_mean":  # PPO's path, unchanged numbers
                loss, stats = policy_loss(new, old, adv, mask, clip_low, num_tokens=num_tokens,
                                          clip_range_high=cfg.loss.clip_high)
            else:  # num_tokens is then the minibatch's sequence count over all ranks
                loss, stats = clipped_policy_loss(new, old, adv, mask, clip_low, cfg.loss.clip_high,
                                                  cfg.aggregation, normalizer=num_tokens)
            if cfg.kl.mode == "loss":  # GRPO's KL term, beta * k3 by default, aggregated like the loss
                ref = pad_right([r["ref_logprobs"] for r in part], mask.shape[1], mask.device)
                kl_term, kl_mean = kl_loss(new, ref, mask, cfg.kl.coef, cfg.aggregation, num_tokens,
                                           cfg.kl.estimator)
                stats = dict(stats, kl=kl_mean)
                totals["kl_loss"] = totals.get("kl_loss", 0.0) + kl_term.item()
                loss = loss + kl_term
            engine.backward(loss * scale)
            self.de.optimizer_step(engine)
            totals["loss"] += loss.item()
            _sum_stats(totals, stats, float(mask.sum()))
        return {"sums": totals, "last": self.de.step_metrics(engine)}

    def save_checkpoint(self, step: int, driver_state: Dict[str, Any]) -> str:
        return self.de.save_checkpoint(self.engine, self._ckpt_dir(), step,
                                       {"data": self.batches.state_dict(), "driver": driver_state},
                                       keep=self.cfg.train.keep_checkpoints)

    def export(self, out_dir: str):
        return self.de.export_hf(self.engine, self.tokenizer, out_dir, merge=self.cfg.export.merge)

    def close(self) -> None:
        self.engine = self.generate_fn = self.ref_engine = self.reward_scorer = None


class ValueWorker:
    """One rank of the critic: per-token values and clipped value-regression steps."""

    def __init__(self, cfg):
        self.cfg, self.de = cfg, de
        de.seed_everything(cfg.seed)
        self.tokenizer = build_tokenizer(cfg.model)
        self.gas = _grad_accum(cfg, de.world_size())
        path = cfg.value_model or cfg.reward_model
        model = TokenScalars(build_scalar_model(replace(cfg.model, name_or_path=path, tokenizer=None),
                                                self.tokenizer, seed=cfg.seed), cfg.model.padding_free)
        optim = replace(cfg.optim, lr=cfg.value_lr if cfg.value_lr is not None else cfg.optim.lr)
        ds = group_deepspeed(cfg, cfg.value, trained=True, grad_accum_steps=self.gas)
        self.engine = de.init_train_engine(model, ds, optim, _optimizer_steps(cfg))
        if cfg.reward_on_value:  # the reward model's own normalisation, for reward_scores
            config = model.model.config
            self.mean, self.std = reward_normalization(config) if cfg.normalize_reward else (0.0, 1.0)
        self.step = 0
        state = de.load_checkpoint(self.engine, self._ckpt_dir()) if cfg.train.resume else None
        if state is not None:
            self.step = state["step"]

    def _ckpt_dir(self) -> str:
        return os.path.join(self.cfg.run_dir, "checkpoints", "value")

    def plan(self) -> Dict[str, Any]:
        return {"start_step": self.step}

    def _values(self, rows: Sequence[Row]):
        batch, plens = collate_on_device(rows, self.tokenizer.pad_token_id)
        mask = response_mask(rows, plens.device)
        values = self.engine(batch["input_ids"], batch["attention_mask"])
        return response_view(values, plens, mask.shape[1], offset=-1), mask

    @torch.no_grad()
    def values(self, rows: Sequence[Row]) -> List[torch.Tensor]:
        out = []
        for part in chunks(rows, self.cfg.deepspeed.micro_batch_size):
            values, _ = self._values(part)
            out += [values[i, : len(r["response"])].cpu() for i, r in enumerate(part)]
        return out

    def reward_scores(self, rows: Sequence[Row]) -> List[float]:
        """With LoRA and the value model started from the reward model: the reward model's
        normalised scores, from this model with its adapters off and its original score head
        (the reward model exactly), so no reward group is needed."""
        assert self.cfg.reward_on_value, "reward_scores: the value model is not the reward model with LoRA"
        with as_reference(self.engine):
            return _scores(self.engine, rows, self.tokenizer.pad_token_id, self.cfg, self.mean, self.std)

    def train_minibatch(self, rows: Sequence[Row], num_tokens: float) -> Dict[str, Dict[str, float]]:
        """As PolicyWorker.train_minibatch, with the clipped value loss."""
        # value_loss already divides by the global token count: see PolicyWorker.train_minibatch.
        scale = self.de.loss_scale(1.0, self.gas)
        totals: Dict[str, float] = {"loss": 0.0}
        for part in chunks(rows, self.cfg.deepspeed.micro_batch_size):
            values, mask = self._values(part)
            old = pad_right([r["old_values"] for r in part], mask.shape[1], mask.device)
            returns = pad_right([r["returns"] for r in part], mask.shape[1], mask.device)
            loss, stats = value_loss(values, old, returns, mask, self.cfg.clip_range_value, num_tokens=num_tokens)
            self.engine.backward(loss * scale)
            self.de.optimizer_step(self.engine)
            totals["loss"] += loss.item()
            _sum_stats(totals, stats, float(mask.sum()))
        return {"sums": totals, "last": self.de.step_metrics(self.engine)}

    def save_checkpoint(self, step: int) -> str:
        return self.de.save_checkpoint(self.engine, self._ckpt_dir(), step, {},
                                       keep=self.cfg.train.keep_checkpoints)

    def close(self) -> None:
        self.engine = None


# ---------------------------------------------------------------------------------------------
# Frozen workers
# ---------------------------------------------------------------------------------------------


def _logprobs(engine, rows: Sequence[Row], pad_id: int, cfg, entropy: bool = False,
              temperature: Optional[float] = None) -> List[Dict[str, Any]]:
    """Per-row log-probs of the sampling distribution, logits / temperature (the rollout's by default)."""
    temperature = temperature or cfg.sampling.temperature
    out = []
    for part in chunks(rows, cfg.deepspeed.micro_batch_size):
        batch, plens = collate_on_device(part, pad_id)
        width = max(len(r["response"]) for r in part)
        lp = sequence_logprobs(engine, batch["input_ids"], batch["attention_mask"], batch["loss_mask"],
                               temperature=temperature, keep_logits=entropy, padding_free=cfg.model.padding_free)
        token_logps = response_view(lp.token_logps, plens, width)
        if entropy:
            ent = response_view(entropy_from_logits(lp.logits.float() / temperature), plens, width, -1)
        for i, r in enumerate(part):
            n = len(r["response"])
            item = {"logprobs": token_logps[i, :n].cpu()}
            if entropy:
                item["entropy"] = float(ent[i, :n].sum())
            out.append(item)
    return out


def build_reference_engine(cfg, tokenizer):
    """The frozen reference policy (the SFT model by default), without adapters, as an eval engine."""
    model = build_causal_lm(replace(cfg.model, name_or_path=cfg.reference_model or cfg.model.name_or_path,
                                    lora=LoRAConfig()), tokenizer, seed=cfg.seed)
    return de.init_eval_engine(model, group_deepspeed(cfg, cfg.reference, trained=False), cfg.optim)


class ReferenceWorker:
    """One rank of the frozen reference policy (the SFT model): log-probs only."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.tokenizer = build_tokenizer(cfg.model)
        self.engine = build_reference_engine(cfg, self.tokenizer)

    @torch.no_grad()
    def logprobs(self, rows: Sequence[Row], temperature: Optional[float] = None) -> List[Dict[str, Any]]:
        return _logprobs(self.engine, rows, self.tokenizer.pad_token_id, self.cfg, temperature=temperature)

    def close(self) -> None:
        self.engine = None


class RewardScorer:
    """The frozen reward model: score at the last token, normalised with the reward_mean /
    reward_std that the reward-model stage stored in its config.json."""

    def __init__(self, cfg, tokenizer):
        self.cfg, self.pad_id = cfg, tokenizer.pad_token_id
        # Frozen: no adapter (the policy's model.lora is not for the reward model).
        model = build_scalar_model(replace(cfg.model, name_or_path=cfg.reward_model, tokenizer=None,
                                           lora=LoRAConfig()), tokenizer, seed=cfg.seed)
        self.mean, self.std = reward_normalization(model.config) if cfg.normalize_reward else (0.0, 1.0)
        self.engine = de.init_eval_engine(TokenScalars(model, cfg.model.padding_free),
                                          group_deepspeed(cfg, cfg.reward, trained=False), cfg.optim)

    @torch.no_grad()
    def scores(self, rows: Sequence[Row]) -> List[float]:
        return _scores(self.engine, rows, self.pad_id, self.cfg, self.mean, self.std)


class RewardWorker:
    """One rank of the reward group: a RewardScorer."""

    def __init__(self, cfg):
        self.scorer = RewardScorer(cfg, build_tokenizer(cfg.model))

    def scores(self, rows: Sequence[Row]) -> List[float]:
        return self.scorer.scores(rows)

    def close(self) -> None:
        self.scorer = None


def _scores(engine, rows: Sequence[Row], pad_id: int, cfg, mean: float, std: float) -> List[float]:
    """Per-row scalar at the last token of a TokenScalars engine, normalised: (raw - mean) / std."""
    out: List[float] = []
    for part in chunks(rows, cfg.deepspeed.micro_batch_size):
        batch, _ = collate_on_device(part, pad_id)
        values = engine(batch["input_ids"], batch["attention_mask"])
        raw = values.gather(1, last_token_index(batch["attention_mask"])[:, None]).squeeze(1)
        out += ((raw - mean) / std).tolist()
    return out
