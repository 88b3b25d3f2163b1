"""Direct preference optimisation from pairs: one recipe for every loss of `PAIRWISE_LOSSES`
(DPO, cDPO, IPO, robust DPO, hinge/SLiC, GPO, DiscoPOP, SimPO, ORPO, RPO), picked by `loss.name`;
and from K-way rankings with `loss.name: plackett_luce` (the DPO paper's listwise form,
direct/listwise.py): the K responses of a prompt in one forward, their reference log-probs cached
like the pairs'.

    python -m direct.dpo --config configs/dpo/default.yaml loss.name=ipo loss.beta=0.5

Per step: chosen and rejected responses of the micro-batch go through the policy in ONE
concatenated (2B, T) forward; reference log-probs come from an on-disk cache computed once
before training (direct.ref_cache), so no reference model is in memory while the policy trains.
Reference-free losses (SimPO, ORPO) skip it. The loss is the weighted mean over the global
batch (all micro-batches of all ranks), whatever the split, as in rlhf/sft.py.

Optional online rounds (`online.rounds > 0`, after Guo et al. 2024, "Direct Language Model
Alignment from Online AI Feedback", arXiv 2402.04792, and Xu et al. 2023, "Some things are more
CRINGE than others", arXiv 2312.16682): each round the policy samples K responses per prompt,
a labeller (the task's gold scorer, a reward model, or a rule) keeps the best and the worst as
a pair, and the round trains on those pairs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Dict, List, Optional, Tuple

import datasets
import numpy as np
import torch
import torch.distributed as dist

from align.config import ConfigError, DataConfig, SourceConfig, check_choice
from align.data.batching import BatchIterator
from align.data.collate import collate_indexed_pairs, collate_listwise
from align.engine import deepspeed_engine as de
from align.evaluation import held_out_report
from align.generation import SamplingConfig, groups, sample_per_prompt
from align.metrics import Means, train_tokens
from align.models.builders import build_causal_lm, build_tokenizer
from align.models.logprobs import pair_logprobs
from align.stage import StageWorker, Throughput, eval_batches, load_prompts, load_tokenized, planned_steps, run_recipe, \
    stage_main
from align.models.logprobs import sequence_logprobs
from direct.losses import PAIRWISE_LOSSES, LossSpec, pairwise_loss, plackett_luce_dpo_loss
from direct.ref_cache import lookup
from direct.reference import DirectConfig, cached_reference, check_model_exists, run_inputs, uses_adapter_reference, \
    with_index
from reward_model.labellers import LABELLERS, best_and_worst, make_labeller

PAIR_PARTS = ("chosen", "rejected")
PAIR_TOKENS = ("prompt_ids", "chosen_ids", "rejected_ids")
LOSS_HPARAMS = ("beta", "label_smoothing", "gamma", "tau", "alpha")
# Listwise DPO on rankings (not a pairwise loss): needs the reference, takes beta only.
PLACKETT_LUCE = LossSpec("plackett_luce", plackett_luce_dpo_loss)


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------


@dataclass
class LossConfig:
    # A key of direct.losses.PAIRWISE_LOSSES: dpo, cdpo, ipo, robust, hinge, slic, gpo_*,
    # discopop, simpo, orpo, rpo; or plackett_luce (listwise DPO: data.train must be rankings).
    name: str = "dpo"
    # Unset (null) values take the loss function's own default. beta: DPO's beta (strength of
    # the implicit KL penalty); IPO's tau; SimPO's beta (reward scale); ORPO's lambda.
    beta: Optional[float] = None
    # Assumed label-flip rate eps (cDPO, robust DPO, SimPO).
    label_smoothing: Optional[float] = None
    # SimPO's target reward margin gamma (reward units).
    gamma: Optional[float] = None
    # DiscoPOP's temperature tau.
    tau: Optional[float] = None
    # Weight of the chosen response's NLL term (RPO, SLiC).
    alpha: Optional[float] = None

    def __post_init__(self) -> None:
        if self.name not in PAIRWISE_LOSSES and self.name != PLACKETT_LUCE.name:
            raise ConfigError(f"loss.name: {self.name!r} is not one of "
                              f"{sorted(PAIRWISE_LOSSES) + [PLACKETT_LUCE.name]}")
        spec = self.spec()
        extra = [k for k in LOSS_HPARAMS if getattr(self, k) is not None and k not in spec.hparams]
        if extra:
            raise ConfigError(f"loss.{extra[0]}: loss {self.name!r} takes only {list(spec.hparams)}")
        missing = [k for k in spec.required if getattr(self, k) is None]
        if missing:
            raise ConfigError(f"loss.{missing[0]}: loss {self.name!r} needs it set")

    def spec(self) -> LossSpec:
        return PLACKETT_LUCE if self.name == PLACKETT_LUCE.name else PAIRWISE_LOSSES[self.name]

    def hparams(self) -> Dict[str, float]:
        """The hyperparameters to pass: those the loss accepts and the config sets."""
        return {k: getattr(self, k) for k in LOSS_HPARAMS if getattr(self, k) is not None}


@dataclass
class OnlineConfig:
    # Rounds of sample -> label -> train (0: offline, train on `data.train`).
    rounds: int = 0
    # Optimizer steps per round (each round's pairs are cycled through as needed).
    steps_per_round: int = 20
    prompts: SourceConfig = field(default_factory=lambda: SourceConfig(path="builtin:prompts"))
    prompts_per_round: int = 128
    # K responses sampled per prompt; the best and the worst make the round's pair.
    samples_per_prompt: int = 4
    # gold: the task's gold scorer; reward_model: `reward_model` dir scored by
    # reward_model.score.RewardScorer; json: 1 when the response parses as JSON, else 0.
    labeller: str = "gold"
    reward_model: Optional[str] = None
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=1.0))

    def __post_init__(self) -> None:
        check_choice("online.labeller", self.labeller, list(LABELLERS))
        if self.labeller == "reward_model" and self.rounds and not self.reward_model:
            raise ConfigError("online.reward_model: needed with online.labeller=reward_model")
        if self.rounds and (self.steps_per_round < 1 or self.samples_per_prompt < 2):
            raise ConfigError("online: needs steps_per_round >= 1 and samples_per_prompt >= 2")


def _default_pairwise_data() -> DataConfig:
    return DataConfig(train=[SourceConfig(path="builtin:preferences")],
                      eval=[SourceConfig(path="builtin:preferences_eval")], max_length=128, max_prompt_length=48)


@dataclass
class DPOConfig(DirectConfig):
    data: DataConfig = field(default_factory=_default_pairwise_data)
    loss: LossConfig = field(default_factory=LossConfig)
    online: OnlineConfig = field(default_factory=OnlineConfig)

    def __post_init__(self) -> None:
        if self.loss.name == PLACKETT_LUCE.name and self.online.rounds:
            raise ConfigError("online.rounds: online rounds label pairs; loss.name=plackett_luce trains on "
                              "the rankings of data.train (set online.rounds=0)")


# ---------------------------------------------------------------------------------------------
# The pairwise worker
# ---------------------------------------------------------------------------------------------


class DPOWorker(StageWorker):
    """One rank of a pairwise preference stage."""

    def __init__(self, cfg: DPOConfig):
        self.cfg = cfg
        self.spec = cfg.loss.spec()
        self.listwise = self.spec is PLACKETT_LUCE
        self.hparams = cfg.loss.hparams()
        de.seed_everything(cfg.seed)
        self.tokenizer = build_tokenizer(cfg.model)
        train, evals, self.report = load_tokenized(cfg.data, "ranking" if self.listwise else "pairwise",
                                                   self.tokenizer, cfg.seed)
        self.train_rows, self.eval_rows = with_index(train), with_index(evals)
        self.parts, self.token_columns = PAIR_PARTS, PAIR_TOKENS
        self.collate = partial(collate_indexed_pairs, pad_id=self.tokenizer.pad_token_id)
        if self.listwise:  # one part per rank position, up to the longest ranking
            k = max(len(r) for rows in (train, evals) if rows is not None for r in rows["responses_ids"])
            self.parts, self.token_columns = tuple(f"rank{j}" for j in range(k)), ("prompt_ids", "responses_ids")
            self.collate = partial(collate_listwise, pad_id=self.tokenizer.pad_token_id, k=k)
        self.prompts = None
        if cfg.final_samples:
            prompts = load_prompts(cfg.eval_prompts, cfg, self.tokenizer)
            self.prompts = prompts.select(range(min(cfg.final_samples, len(prompts))))
        self.online_prompts = load_prompts(cfg.online.prompts, cfg, self.tokenizer) if cfg.online.rounds else None
        self.labeller = None
        if cfg.online.rounds:
            self.labeller = make_labeller(cfg.online.labeller, cfg.online.prompts.path, cfg.online.reward_model,
                                          cfg.model.trust_remote_code)
        # Reference log-probs first: the reference is built (on a cache miss), used and freed
        # before the policy engine exists. With LoRA the reference is the policy with its
        # adapter off, so they come once the engine exists.
        self.ref, self.ref_info = {}, {}
        splits = {"eval": self.eval_rows} if cfg.online.rounds else {"train": self.train_rows, "eval": self.eval_rows}
        reference = partial(cached_reference, cfg, self.tokenizer, splits, self.collate, self.parts, self.token_columns)
        if self.spec.needs_reference and not uses_adapter_reference(cfg):
            self.ref, self.ref_info = reference()
        self.batches = self._batches(self.train_rows, cfg.seed)
        self.data_iter = iter(self.batches)
        if cfg.online.rounds:
            self.total_steps = cfg.online.rounds * cfg.online.steps_per_round
        else:
            self.total_steps = planned_steps(cfg.train, len(self.batches), cfg.deepspeed.grad_accum_steps)
        model = build_causal_lm(cfg.model, self.tokenizer, seed=cfg.seed)
        self.engine = de.init_train_engine(model, cfg.deepspeed, cfg.optim, self.total_steps)
        if self.spec.needs_reference and uses_adapter_reference(cfg):
            self.ref, self.ref_info = reference(policy=self.engine)
        self.throughput, self.round_metrics = None, {}
        self.resume(restore_data=not cfg.online.rounds)  # online: a resumed run starts a fresh round

    def _batches(self, rows, seed: int):
        return BatchIterator(rows, self.cfg.deepspeed.micro_batch_size, seed, de.rank(), de.world_size(),
                             collate_fn=self.collate)

    def plan(self) -> Dict[str, Any]:
        return {"total_steps": self.total_steps, "start_step": self.step,
                "progress_keys": ["loss", "rewards/accuracies", "tokens_per_s"],
                "summary": {"train_rows": len(self.train_rows), "data_report": dict(self.report),
                            "loss": {"name": self.cfg.loss.name, **self.hparams},
                            "reference_cache": self.ref_info}}

    def pair_losses(self, batch: Dict[str, torch.Tensor], ref: Dict[str, torch.Tensor]):
        """Per-pair (or per-ranking) losses (B,) with grad, and per-example statistics for the metrics."""
        if self.listwise:
            return self.ranking_losses(batch, ref)
        n = batch["weight"].shape[0]
        # Each pair's prompt is forwarded once (padding-free forwards with the varlen attention).
        lp = pair_logprobs(self.engine, batch["input_ids"], batch["attention_mask"], batch["loss_mask"],
                           batch["prompt_lengths"], padding_free=self.cfg.model.padding_free)
        stat = "mean" if self.spec.length_normalized else "sum"
        logps = lp.mean if self.spec.length_normalized else lp.sum
        inputs = {"policy_chosen_logps": logps[:n], "policy_rejected_logps": logps[n:]}
        if self.spec.needs_reference:
            inputs["ref_chosen_logps"] = lookup(ref, batch["index"], "chosen", stat)
            inputs["ref_rejected_logps"] = lookup(ref, batch["index"], "rejected", stat)
        if self.spec.needs_chosen_nll:
            inputs["chosen_nll"] = -lp.mean[:n]  # token-averaged NLL of the chosen response
        losses, chosen, rejected = pairwise_loss(self.cfg.loss.name, **inputs, **self.hparams)
        stats = {"loss": losses, "rewards/chosen": chosen, "rewards/rejected": rejected,
                 "rewards/margins": chosen - rejected, "rewards/accuracies": (chosen > rejected).float(),
                 "logps/chosen": logps[:n], "logps/rejected": logps[n:]}
        if self.spec.needs_chosen_nll:
            stats["nll"] = inputs["chosen_nll"]
        return losses, stats

    def ranking_losses(self, batch: Dict[str, torch.Tensor], ref: Dict[str, torch.Tensor]):
        """Plackett-Luce losses (B,) of K-way rankings; chosen = the best response, rejected =
        the worst one of each ranking."""
        mask = batch["mask"]
        b, k = mask.shape
        lp = sequence_logprobs(self.engine, batch["input_ids"], batch["attention_mask"], batch["loss_mask"],
                               padding_free=self.cfg.model.padding_free)
        logps = lp.sum.view(k, b).t()  # (B, K): block j of the batch holds every ranking's j-th response
        ref_logps = torch.stack([lookup(ref, batch["index"], part, "sum") for part in self.parts], dim=1)
        losses, rewards = plackett_luce_dpo_loss(logps, ref_logps, mask=mask, **self.hparams)
        last = (mask.long().sum(1) - 1)[:, None]  # each ranking's worst response
        chosen, rejected = rewards[:, 0], rewards.gather(1, last)[:, 0]
        stats = {"loss": losses, "rewards/chosen": chosen, "rewards/rejected": rejected,
                 "rewards/margins": chosen - rejected, "rewards/accuracies": (chosen > rejected).float(),
                 "logps/chosen": logps[:, 0].detach(), "logps/rejected": logps.gather(1, last)[:, 0].detach()}
        return losses, stats

    def train_step(self) -> Dict[str, float]:
        engine = self.engine
        self.throughput = self.throughput or Throughput()
        if self.cfg.online.rounds and self.step % self.cfg.online.steps_per_round == 0:
            self.round_metrics = self._online_round(self.step // self.cfg.online.steps_per_round)
        batches = [de.to_device(next(self.data_iter)) for _ in range(self.cfg.deepspeed.grad_accum_steps)]
        # The loss is sum(w * l) / sum(w) over the global batch: each micro-batch backpropagates
        # its share (de.loss_scale).
        local = torch.tensor([sum(float(b["weight"].sum()) for b in batches),
                              sum(train_tokens(b) for b in batches)], device=de.device())
        total_weight, tokens = de.all_reduce_sum(local).tolist()
        scale = de.loss_scale(total_weight, len(batches))
        means = Means()
        for b in batches:
            losses, stats = self.pair_losses(b, self.ref.get("train"))
            engine.backward((losses * b["weight"]).sum() * scale)
            de.optimizer_step(engine)
            for name, values in stats.items():
                means.add(name, values, b["weight"])
        self.step += 1
        metrics = dict(means.reduce(de.all_reduce_sum), **de.step_metrics(engine), tokens=tokens,
                       tokens_per_s=self.throughput.tick(tokens), **self.round_metrics)
        self.round_metrics = {}
        return metrics

    @torch.no_grad()
    def evaluate(self, final: bool = False) -> Dict[str, Any]:
        engine = self.engine
        engine.eval()
        metrics: Dict[str, Any] = {}
        if self.eval_rows is not None:
            means = Means()
            for b in eval_batches(self.eval_rows, self.cfg.deepspeed.micro_batch_size, de.rank(), de.world_size(),
                                  self.collate):
                b = de.to_device(b)
                _, stats = self.pair_losses(b, self.ref.get("eval"))
                for name, values in stats.items():
                    means.add(name, values, b["weight"] * b["valid"])
            metrics = {f"eval/{k}": v for k, v in means.reduce(de.all_reduce_sum).items()}
        if final and self.prompts is not None:
            task_paths = [self.cfg.eval_prompts.path, *(s.path for s in self.cfg.data.train)]
            metrics.update(held_out_report(partial(de.generate, engine), self.tokenizer, self.prompts,
                                           self.cfg.sampling, self.cfg.seed, task_paths, de.device()))
        engine.train()
        return metrics

    # -- online rounds ----------------------------------------------------------------------

    def _online_round(self, round_index: int) -> Dict[str, float]:
        """Samples K responses per prompt, labels best/worst pairs, and trains on them next."""
        cfg = self.cfg.online
        world, rank, k = de.world_size(), de.rank(), cfg.samples_per_prompt
        rng = np.random.default_rng([self.cfg.seed, 7, round_index])
        n = max(world, min(cfg.prompts_per_round, len(self.online_prompts)) // world * world)
        picked = rng.choice(len(self.online_prompts), size=n, replace=n > len(self.online_prompts))
        rows = self.online_prompts.select(picked[rank::world].tolist())  # equal share per rank
        out = sample_per_prompt(partial(de.generate, self.engine), self.tokenizer, rows["prompt_ids"], k,
                                cfg.sampling, micro_batch_size=self.cfg.deepspeed.micro_batch_size,
                                seed=self.cfg.seed + 1000 * (round_index + 1) + rank, device=de.device())
        scores = self.labeller([m for m in rows["messages"] for _ in range(k)], out.texts)
        pairs = []
        for group in groups(range(len(scores)), k):
            picked = best_and_worst([scores[j] for j in group])
            if picked is not None:  # ties carry no preference
                best, worst = group[picked[0]], group[picked[1]]
                pairs.append((out.prompt_ids[best], out.response_ids[best], out.response_ids[worst]))
        if dist.is_initialized() and world > 1:
            shares: List = [None] * world
            dist.all_gather_object(shares, pairs)
            pairs = [p for share in shares for p in share]
        gathered = de.all_reduce_sum(torch.tensor([sum(scores), float(len(scores))], device=de.device())).tolist()
        if len(pairs) < self.cfg.deepspeed.micro_batch_size * world:
            raise RuntimeError(f"online round {round_index}: only {len(pairs)} labelled pairs (ties dropped), "
                               "fewer than one global batch; raise online.prompts_per_round")
        rows = with_index(_pair_rows(pairs))
        if self.spec.needs_reference:
            ref, _ = cached_reference(self.cfg, self.tokenizer, {"train": rows}, self.collate, PAIR_PARTS, PAIR_TOKENS,
                                      policy=self.engine)
            self.ref["train"] = ref["train"]
        self.train_rows, self.batches = rows, self._batches(rows, self.cfg.seed + round_index)
        self.data_iter = iter(self.batches)
        return {"online/round": round_index, "online/pairs": len(pairs), "online/score": gathered[0] / gathered[1]}


def _pair_rows(pairs: List[Tuple[List[int], List[int], List[int]]]):
    """Sampled (prompt, chosen, rejected) token ids as rows `collate_pairwise` takes."""
    prompts, chosen, rejected = (list(x) for x in zip(*pairs))
    n = len(pairs)
    return datasets.Dataset.from_dict({"prompt_ids": prompts, "chosen_ids": chosen, "rejected_ids": rejected,
                                       "margin": [0.0] * n, "weight": [1.0] * n, "group": list(range(n))})


def run(cfg: DPOConfig, reuse: bool = True, group: Optional[str] = None) -> Dict[str, Any]:
    check_model_exists(cfg)
    sources = [*cfg.data.train, *cfg.data.eval, cfg.eval_prompts] + ([cfg.online.prompts] if cfg.online.rounds else [])
    return run_recipe(cfg.loss.name, cfg, DPOWorker, sources, run_inputs(cfg), group, reuse)


def main(argv=None) -> int:
    return stage_main(argv, DPOConfig, run, "Direct preference optimisation (DPO and relatives) from pairs.")


if __name__ == "__main__":
    raise SystemExit(main())
