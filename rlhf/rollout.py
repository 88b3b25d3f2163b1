"""The driver's side of an online RL stage: its groups of Ray actors, rollouts, the groups'
forwards over a rollout, minibatch updates, evaluation, checkpoints and export.

`run_stage` (align/stage.py) drives a `RolloutStage`; the algorithm plugs in as an object with
`step(stage, step) -> metrics`, `state_dict()` and `load_state_dict(state)` (rlhf/ppo.py `PPO`:
experience, KL-shaped rewards, GAE, the update's metrics). The groups a run starts are data
(`groups_for`): everything here iterates over the groups present, so an estimator without a
critic simply starts no value group.

Rows travel between groups as {"prompt": ids, "response": ids}; `ActorGroup.scatter` gives each
rank a contiguous, equally long share and `gather` returns one result per row in row order.
"""

from __future__ import annotations

import json
import statistics
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch

from align.engine.ray_group import (ActorGroup, create_placement_group, remove_shared_placement_group, running_alone,
                                    start_ray)
from align.evaluation import bootstrap_ci
from align.task import gold_scorer_for
from reward_model.rewards import REWARD_MODEL, build_reward
from rlhf.ppo_math import Trajectory
from rlhf.ppo_workers import PolicyWorker, ReferenceWorker, RewardWorker, ValueWorker, pad_right

# The per-rank class of every group a rollout stage can start (one config section each).
WORKERS = {"policy": PolicyWorker, "value": ValueWorker, "reference": ReferenceWorker, "reward": RewardWorker}
GROUP_ORDER = ("policy", "value", "reference", "reward")
# What each group computes over a rollout's rows (method, keyword arguments), in call order;
# without a reference or reward group (LoRA), ON_ADAPTER_OFF says who serves them.
INFERENCE = (("policy", "logprobs", {"entropy": True}), ("reference", "logprobs", {}),
             ("value", "values", {}), ("reward", "scores", {}))
# With LoRA the trained groups serve the frozen ones with their adapters off (rlhf/ppo.py); with
# reference_on_policy the policy ranks serve the reference from their own copy.
ON_ADAPTER_OFF = {"reference": ("policy", "ref_logprobs"), "reward": ("value", "reward_scores")}
# The trained groups, and the per-row fields their train_minibatch reads from the Trajectory.
TRAIN_FIELDS = {"policy": {"old_logprobs": "logprobs", "advantages": "advantages"},
                "value": {"old_values": "values", "returns": "returns"}}


def groups_for(cfg) -> Tuple[str, ...]:
    """The groups a run starts: the value model only for an estimator that needs one (gae), the
    reward model only when a reward.fns term is "reward_model", the reference only without LoRA
    (with it, the policy ranks serve the reference with their adapter off, and a value model
    started from the reward model serves the reward; with reference_on_policy / reward_on_policy
    the policy ranks hold a reference / reward model copy). Everything else iterates over the
    groups present."""
    return tuple(g for g in GROUP_ORDER if (g != "value" or cfg.uses_value_model)
                 and (g != "reward" or cfg.uses_reward_model and not cfg.reward_on_value and not cfg.reward_on_policy)
                 and (g != "reference" or not cfg.reference_served_by_policy))


def train_fields(cfg) -> Dict[str, Dict[str, str]]:
    """TRAIN_FIELDS of the trained groups; kl.mode=loss also sends the reference log-probs."""
    fields = {g: dict(f) for g, f in TRAIN_FIELDS.items()}
    if cfg.kl.mode == "loss":
        fields["policy"]["ref_logprobs"] = "ref_logprobs"
    return fields


def mean_ci(values: Sequence[float], seed: int) -> tuple:
    """(mean, low, high) with the 95% percentile bootstrap interval of align.evaluation."""
    return (statistics.mean(values), *bootstrap_ci(list(values), 1000, seed))


class RolloutStage:
    """The groups of an online RL run and one step at a time, for `run_stage`."""

    def __init__(self, cfg, algorithm):
        self.cfg, self.algorithm = cfg, algorithm
        names = groups_for(cfg)
        start_ray(cfg.ray)
        self.pg = None
        if cfg.colocate:
            self.pg = create_placement_group(max(getattr(cfg, g).num_actors for g in names), cfg.ray)
        self.groups: Dict[str, ActorGroup] = {}
        share = 1.0 / len(names) if cfg.colocate else 1.0
        try:
            for name in names:
                self.groups[name] = ActorGroup(name, cfg.ray, getattr(cfg, name).num_actors, pg=self.pg, share=share)
            # The groups load their models at the same time (one driver thread each).
            with ThreadPoolExecutor(len(names)) as pool:
                for done in [pool.submit(self.groups[g].setup, WORKERS[g], cfg) for g in names]:
                    done.result()
            plans = {g: self.groups[g].call("plan")[0] for g in TRAIN_FIELDS if g in self.groups}
        except BaseException:
            self.shutdown()
            raise
        self._plan = plans["policy"]
        for g, plan in plans.items():
            if plan["start_step"] != self._plan["start_step"]:
                self.shutdown()
                raise RuntimeError(f"{cfg.run_dir}/checkpoints: policy is at step {self._plan['start_step']} but {g} "
                                   f"at {plan['start_step']}; delete the newer one's last checkpoint")
        state = self._plan["driver_state"]
        self.algorithm.load_state_dict(state)
        self.start_eval: Dict[str, Any] = state.get("start_eval", {})
        self.gold = gold_scorer_for(s.path for s in cfg.data.train)
        # The configured reward; a "reward_model" term reads the reward group's scores of the batch.
        self._rm_scores: List[float] = []
        only_rm = [t.fn for t in cfg.reward.fns] == [REWARD_MODEL] and cfg.reward.fns[0].weight == 1.0
        self.reward_fn = None if only_rm else build_reward(cfg.reward, [s.path for s in cfg.data.train], self)

    # -- what run_stage drives --------------------------------------------------------------------

    def plan(self) -> Dict[str, Any]:
        return {"total_steps": self.cfg.train.max_steps, "start_step": self._plan["start_step"],
                "eval_at_start": self.cfg.eval_at_start,
                "progress_keys": ["objective/scores", "objective/kl", "gold/score"]}

    def train_step(self, step: int) -> Dict[str, float]:
        return self.algorithm.step(self, step)

    def evaluate(self, final: bool = False, start: bool = False) -> Dict[str, Any]:
        """Gold score (95% bootstrap CI) and per-sequence KL to the reference on held-out prompts;
        keys `eval/...`, or `eval_start/...` for the starting policy."""
        metrics = self._evaluate("eval_start" if start else "eval")
        if start:
            self.start_eval = metrics
        return metrics

    def save_checkpoint(self, step: int) -> None:
        state = {**self.algorithm.state_dict(), "start_eval": self.start_eval}
        refs = {g: self.groups[g].call_async("save_checkpoint", step, *([state] if g == "policy" else []))
                for g in TRAIN_FIELDS if g in self.groups}
        for g, r in refs.items():
            self.groups[g].get(r)

    def export(self, out_dir: str) -> None:
        self.groups["policy"].call("export", out_dir)

    def summary(self) -> Dict[str, Any]:
        return {"start_eval": self.start_eval, "prompts": self._plan["prompts"],
                "data_report": self._plan["data_report"]}

    def shutdown(self) -> None:
        for group in self.groups.values():
            group.shutdown()
        self.groups = {}
        if self.pg is not None:
            remove_shared_placement_group(self.pg)
            self.pg = None

    # -- moving rows through the groups -----------------------------------------------------------

    def _sample(self, method: str, *args) -> Dict[str, list]:
        with running_alone([self.groups["policy"]]):  # the other groups wait for the samples
            parts = self.groups["policy"].call(method, *args)
        return {k: [x for p in parts for x in p[k]] for k in parts[0]}

    def rollout(self, step: int) -> Dict[str, list]:
        """Prompts, responses, EOS flags and texts sampled by every policy rank, in rank order."""
        return self._sample("rollout", step)

    def _route(self, group: str, method: str = "logprobs") -> Tuple[str, str]:
        """The (group, method) that serves `group.method`: with LoRA, the reference's log-probs
        come from the policy group and the reward from the value group, adapters off."""
        if group == "reward" and self.cfg.reward_on_policy:
            return "policy", "reward_scores"
        if group in ON_ADAPTER_OFF and group not in self.groups and ON_ADAPTER_OFF[group][0] in self.groups:
            return ON_ADAPTER_OFF[group]
        return group, method

    def logprobs(self, rows: Sequence[Dict[str, list]], group: str = "policy") -> List[torch.Tensor]:
        """Response log-probs of {"prompt", "response"} rows under the policy or the reference."""
        name, method = self._route(group)
        return [o["logprobs"] for o in self.groups[name].gather(self.groups[name].scatter(method, rows))]

    def score(self, prompt, response) -> List[float]:
        """The "reward_model" term of `reward_fn`: the reward group's scores of the current batch."""
        assert len(self._rm_scores) == len(response)
        return self._rm_scores

    def _combine(self, rollout: Dict[str, list], rm_scores: List[float]) -> Dict[str, Any]:
        """The rollout's rewards (B,) from the reward terms (the reward model's normalised scores
        alone when that is the only term, as before), and each term's values for logging."""
        if self.reward_fn is None:
            return {"scores": torch.tensor(rm_scores), "reward_terms": {}}
        self._rm_scores = rm_scores
        extras = [json.loads(e) if e else {} for e in rollout.get("extras", [""] * len(rollout["text"]))]
        result = self.reward_fn(rollout["prompt_text"], rollout["text"], extras)
        return {"scores": torch.tensor(result.total), "reward_terms": result.terms}

    def score_rollout(self, rollout: Dict[str, list]) -> Dict[str, Any]:
        """The rollout's rewards alone (dynamic sampling needs them before the other forwards)."""
        rm = []
        name, method = self._route("reward", "scores")
        if self.cfg.uses_reward_model:
            rows = [{"prompt": p, "response": r} for p, r in zip(rollout["prompt"], rollout["response"])]
            rm = self.groups[name].gather(self.groups[name].scatter(method, rows))
        return self._combine(rollout, rm)

    def inference(self, rollout: Dict[str, list], scores=None) -> Dict[str, Any]:
        """Every started group's forward over the rollout, all groups at once: the rows, mask,
        policy log-probs and summed entropy, reference log-probs, values (None without a value
        group) and the rollout's rewards (B,) (the given `scores` if any: the reward group then
        skips). Tensors (B, T) are right-padded."""
        rows = [{"prompt": p, "response": r} for p, r in zip(rollout["prompt"], rollout["response"])]
        # The sampler's log-probs, taken with the same weights, stand for the policy's forward.
        sampled = rollout.get("sampler_logprobs")
        from_sampler = sampled is not None and all(lp is not None for lp in sampled)
        calls = [(g, *self._route(g, method), kwargs) for g, method, kwargs in INFERENCE]
        calls = [c for c in calls if c[1] in self.groups and not (c[0] == "reward" and scores is not None)
                 and not (c[0] == "policy" and from_sampler)]
        busy = [self.groups[name] for name in dict.fromkeys(name for _, name, _, _ in calls)]
        with running_alone(busy):  # e.g. GRPO with a rule reward: the policy ranks alone
            # Every call is submitted before any result is read; one group runs its calls in order.
            pending = {g: (name, self.groups[name].scatter(method, rows, **kwargs)) for g, name, method, kwargs in calls}
            out = {g: self.groups[name].gather(p) for g, (name, p) in pending.items()}
        if from_sampler:
            out["policy"] = [{"logprobs": lp, "entropy": e} for lp, e in zip(sampled, rollout["sampler_entropy"])]
        rewards = ({"scores": scores, "reward_terms": {}} if scores is not None
                   else self._combine(rollout, out.get("reward", [])))
        return {"rows": rows, "mask": pad_right([torch.ones(len(r)) for r in rollout["response"]]),
                "logprobs": pad_right([o["logprobs"] for o in out["policy"]]),
                "entropy": sum(o["entropy"] for o in out["policy"]),
                "ref_logprobs": pad_right([o["logprobs"] for o in out["reference"]]),
                "values": pad_right(out["value"]) if "value" in out else None, **rewards}

    def update(self, rows: Sequence[Dict[str, list]], traj: Trajectory, step: int) -> tuple:
        """ppo_epochs passes of num_minibatches optimizer steps on every trained group at once.

        Each minibatch is split across a group's ranks; `num_tokens`, its response-token count
        over all ranks, makes every rank's loss its share of one mean. Returns the per-group sums
        of train_minibatch's stats, each group's last {lr, grad_norm}, and the tokens trained on.
        """
        cfg, n = self.cfg, len(rows)
        lengths = traj.mask.sum(1).long().tolist()
        trained = {g: fields for g, fields in train_fields(cfg).items() if g in self.groups}
        # The policy loss's global normaliser: tokens (token_mean) or sequences (seq_mean_*).
        per_row = lengths if cfg.aggregation == "token_mean" else [1 if x else 0 for x in lengths]
        sums: Dict[str, Dict[str, float]] = {g: {} for g in trained}
        last: Dict[str, Dict[str, float]] = {}
        tokens = 0.0
        with running_alone([self.groups[g] for g in trained]):  # the other groups wait meanwhile
            for epoch in range(cfg.ppo_epochs):
                order = np.random.default_rng([cfg.seed, step, epoch]).permutation(n).tolist()
                for mb in range(cfg.num_minibatches):
                    idx = order[mb * n // cfg.num_minibatches:(mb + 1) * n // cfg.num_minibatches]
                    num_tokens = float(sum(lengths[i] for i in idx))
                    tokens += num_tokens
                    normalizer = {"policy": float(sum(per_row[i] for i in idx)), "value": num_tokens}
                    pending = {g: self.groups[g].scatter("train_minibatch", [
                        dict(rows[i], **{k: getattr(traj, src)[i, : lengths[i]] for k, src in fields.items()})
                        for i in idx], num_tokens=normalizer[g]) for g, fields in trained.items()}
                    for g, (refs, _) in pending.items():
                        parts = self.groups[g].get(refs)
                        for part in parts:
                            for k, v in part["sums"].items():
                                sums[g][k] = sums[g].get(k, 0.0) + v
                        last[g] = parts[0]["last"]
        return sums, last, tokens

    def _evaluate(self, prefix: str) -> Dict[str, Any]:
        cfg = self.cfg
        if not cfg.eval_prompts:
            return {}
        out = self._sample("eval_rollout", cfg.eval_prompts)
        rows = [{"prompt": p, "response": r} for p, r in zip(out["prompt"], out["response"])]
        # k1 per sequence, sum over tokens of log pi - log pi_ref: unbiased for KL(pi || pi_ref).
        pending = [(name, self.groups[name].scatter(method, rows, temperature=cfg.eval_sampling.temperature))
                   for name, method in map(self._route, ("policy", "reference"))]  # both groups at once
        pol, ref = ([o["logprobs"] for o in self.groups[g].gather(p)] for g, p in pending)
        kl = [float((a - b).sum()) for a, b in zip(pol, ref)]
        metrics = {"n": len(rows), "length": statistics.mean(len(r) for r in out["response"]),
                   "eos_rate": statistics.mean(map(float, out["eos"]))}
        metrics.update(zip(("kl", "kl_ci_low", "kl_ci_high"), mean_ci(kl, cfg.seed)))
        if "gold" in out:  # scored on the policy ranks by the task's gold scorer
            gold = out["gold"]
            metrics.update(zip(("gold", "gold_ci_low", "gold_ci_high"), mean_ci(gold, cfg.seed)))
        metrics = {f"{prefix}/{k}": v for k, v in metrics.items()}
        metrics[f"{prefix}/examples"] = out["text"][:3]
        return metrics
