"""PPO from a reward model: the last stage of the RLHF pipeline (Ziegler et al. 2019, arXiv
1909.08593; InstructGPT, arXiv 2203.02155).

Four groups of Ray actors (rlhf/ppo_roles.py): the policy and the value model are trained, the
reference (the SFT model) and the reward model are frozen. One PPO step, driven from here:

    rollout      the policy ranks sample responses to their share of the step's prompts
    experience   in parallel: old log-probs and entropy (policy), reference log-probs,
                 values, normalised scores; then, here on the whole batch, KL-penalised rewards,
                 GAE and advantage whitening (global: the driver holds every row)
    train        ppo_epochs x num_minibatches: each minibatch is split across the ranks of the
                 policy and value groups, which update in parallel; losses are token means over
                 the whole minibatch whatever the split (rlhf/ppo_math.py does the math)

    python -m rlhf.ppo --config configs/ppo/default.yaml reward_model=runs/reward_model/model
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from omegaconf import MISSING

from align.config import ConfigError, DataConfig, SourceConfig, StageConfig, check_choice, check_positive
from align.generation import SamplingConfig

log = logging.getLogger("rlhf.ppo")
GROUPS = ("policy", "value", "reference", "reward")


@dataclass
class RoleConfig:
    # Ranks (Ray actors) of this group; the group's work is split evenly across them.
    num_actors: int = 1
    # ZeRO stage. Trained groups (policy, value): 0-3. Frozen groups (reference, reward): 0
    # (a full copy per rank) or 3 (sharded inference).
    zero_stage: int = 0
    # Trained groups: optimizer state (and under ZeRO-3 the parameters) in CPU memory.
    # Frozen groups: parameters in CPU memory (needs zero_stage 3).
    offload: bool = False


@dataclass
class KLConfig:
    # beta, the weight of the KL penalty in R = r - beta * KL (Ziegler et al. eq. 2); adaptive: its start.
    coef: float = 0.05
    # Per-token estimator of KL(pi || pi_ref): k1 (log-ratio), k2 (squared / 2) or k3 (Schulman 2020).
    estimator: str = "k1"
    # Adapt beta to keep the per-sequence KL near `target` nats, over `horizon` samples.
    adaptive: bool = False
    target: float = 6.0
    horizon: float = 10000.0


def _default_ppo_data() -> DataConfig:
    return DataConfig(train=[SourceConfig(path="builtin:prompts")], eval=[SourceConfig(path="builtin:eval_prompts")],
                      max_length=128, max_prompt_length=48)


@dataclass
class PPOConfig(StageConfig):
    data: DataConfig = field(default_factory=_default_ppo_data)
    # `model` is the policy's start (the SFT model). The reward model's directory (reward-model stage).
    reward_model: str = MISSING
    # The value model's start; the reward model by default. The reference; `model` by default.
    value_model: Optional[str] = None
    reference_model: Optional[str] = None
    policy: RoleConfig = field(default_factory=RoleConfig)
    value: RoleConfig = field(default_factory=RoleConfig)
    reference: RoleConfig = field(default_factory=RoleConfig)
    reward: RoleConfig = field(default_factory=RoleConfig)
    # Put the four groups on one placement group, each asking a quarter of every bundle.
    colocate: bool = False
    # Prompts per PPO step (all policy ranks together), one response each.
    rollout_batch_size: int = 32
    # Prompts per generate() call on a rank.
    generation_batch_size: int = 32
    # ZeRO-3 policy: gather the full weights on every rank for generation (fast); off, each
    # decoding step gathers layer by layer (slow, but the model never has to fit on one device).
    gather_for_generation: bool = True
    # Passes over each rollout batch, and optimizer steps per pass.
    ppo_epochs: int = 2
    num_minibatches: int = 2
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(max_new_tokens=32))
    kl: KLConfig = field(default_factory=KLConfig)
    # Subtracted from the score of responses that did not end with EOS (TRL's missing_eos_penalty).
    missing_eos_penalty: Optional[float] = None
    # Clip normalised scores to [-score_clip, score_clip].
    score_clip: Optional[float] = None
    # Normalise scores with the reward model's reward_mean / reward_std (config.json).
    normalize_reward: bool = True
    # GAE discount gamma and lambda (Schulman et al. 2015); PPO clip epsilon for policy and value.
    gamma: float = 1.0
    lam: float = 0.95
    clip_range: float = 0.2
    clip_range_value: Optional[float] = 0.2
    # The value model's learning rate; optim.lr when unset.
    value_lr: Optional[float] = None
    # Final evaluation: this many held-out prompts, sampled with eval_sampling and the run's seed
    # (0 skips it); `eval_at_start` evaluates the starting policy the same way first.
    eval_prompts: int = 128
    eval_sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(max_new_tokens=32))
    eval_at_start: bool = True

    def __post_init__(self) -> None:
        check_choice("kl.estimator", self.kl.estimator, ["k1", "k2", "k3"])
        check_positive("kl.coef", self.kl.coef, allow_zero=True)
        for name in GROUPS:
            role = getattr(self, name)
            check_positive(f"{name}.num_actors", role.num_actors)
            trained = name in ("policy", "value")
            check_choice(f"{name}.zero_stage", role.zero_stage, [0, 1, 2, 3] if trained else [0, 3])
            if role.offload and role.zero_stage == 0 or role.offload and not trained and role.zero_stage != 3:
                raise ConfigError(f"{name}.offload: needs zero_stage {'>= 1' if trained else '3'}")
        if self.rollout_batch_size % self.num_minibatches:
            raise ConfigError(f"rollout_batch_size ({self.rollout_batch_size}) must be a multiple of "
                              f"num_minibatches ({self.num_minibatches})")
        minibatch = self.rollout_batch_size // self.num_minibatches
        for name in ("policy", "value"):
            if minibatch % getattr(self, name).num_actors:
                raise ConfigError(f"{name}.num_actors must divide the minibatch of {minibatch} rollouts")


def mean_ci(values: Sequence[float], seed: int) -> tuple:
    """(mean, low, high) with the 95% percentile bootstrap interval of align.evaluation."""
    from align.evaluation import bootstrap_ci

    return (statistics.mean(values), *bootstrap_ci(list(values), 1000, seed))


class PPOTrainer:
    """The driver's side of the stage: the four groups and one PPO step at a time."""

    def __init__(self, cfg: PPOConfig):
        from align.engine.ray_group import ActorGroup, create_placement_group, start_ray
        from align.task import gold_scorer_for
        from rlhf import ppo_roles
        from rlhf.ppo_math import AdaptiveKLController, FixedKLController

        self.cfg = cfg
        start_ray(cfg.ray)
        roles = {"policy": ppo_roles.PolicyRole, "value": ppo_roles.ValueRole,
                 "reference": ppo_roles.ReferenceRole, "reward": ppo_roles.RewardRole}
        self.pg = None
        if cfg.colocate:
            self.pg = create_placement_group(max(getattr(cfg, g).num_actors for g in GROUPS), cfg.ray)
        self.groups: Dict[str, Any] = {}
        share = 1.0 / len(GROUPS) if cfg.colocate else 1.0
        try:
            for name in GROUPS:
                self.groups[name] = ActorGroup(name, cfg.ray, getattr(cfg, name).num_actors, pg=self.pg, share=share)
            # The four groups load their models at the same time (one driver thread each).
            with ThreadPoolExecutor(len(GROUPS)) as pool:
                for done in [pool.submit(self.groups[g].setup, roles[g], cfg) for g in GROUPS]:
                    done.result()
            plans = {g: self.groups[g].call("plan")[0] for g in ("policy", "value")}
        except BaseException:
            self.shutdown()
            raise
        self.plan = plans["policy"]
        if plans["value"]["start_step"] != self.plan["start_step"]:
            self.shutdown()
            raise RuntimeError(f"{cfg.run_dir}/checkpoints: policy is at step {self.plan['start_step']} but value "
                               f"at {plans['value']['start_step']}; delete the newer one's last checkpoint")
        state = self.plan["driver_state"]
        self.kl_ctl = (AdaptiveKLController(cfg.kl.coef, cfg.kl.target, cfg.kl.horizon) if cfg.kl.adaptive
                       else FixedKLController(cfg.kl.coef))
        self.kl_ctl.value = state.get("kl_coef", self.kl_ctl.value)
        self.start_eval: Dict[str, float] = state.get("start_eval", {})
        self.gold = gold_scorer_for(s.path for s in cfg.data.train)

    # -- moving rows through groups --------------------------------------------------------------

    def _scatter(self, group: str, method: str, rows: Sequence[Any], **kwargs):
        from rlhf.ppo_roles import split_even

        parts, counts = split_even(rows, self.groups[group].world_size)
        return self.groups[group].call_async(method, per_rank=[(p,) for p in parts], **kwargs), counts

    def _gather(self, group: str, pending) -> List[Any]:
        refs, counts = pending
        return [x for part, n in zip(self.groups[group].get(refs), counts) for x in part[:n]]

    def logprobs(self, rows: Sequence[Dict[str, list]], group: str = "policy") -> List[torch.Tensor]:
        """Response log-probs of {"prompt", "response"} rows under the policy or the reference."""
        return [o["logprobs"] for o in self._gather(group, self._scatter(group, "logprobs", rows))]

    def _sample(self, method: str, *args) -> Dict[str, list]:
        parts = self.groups["policy"].call(method, *args)
        return {k: [x for p in parts for x in p[k]] for k in parts[0]}

    def rollout(self, step: int) -> Dict[str, list]:
        """Prompts, responses, EOS flags and texts sampled by every policy rank, in rank order."""
        return self._sample("rollout", step)

    # -- one PPO step -----------------------------------------------------------------------------

    def experience(self, rollout: Dict[str, list]) -> Dict[str, Any]:
        """Log-probs, values and scores from the four groups at once, then rewards and GAE."""
        from rlhf.ppo_math import (clip_and_normalize_score, compute_gae, compute_rewards, masked_mean,
                                   masked_whiten)
        from rlhf.ppo_roles import pad_right as padded

        cfg = self.cfg
        rows = [{"prompt": p, "response": r} for p, r in zip(rollout["prompt"], rollout["response"])]
        pending = {"policy": self._scatter("policy", "logprobs", rows, entropy=True),
                   "reference": self._scatter("reference", "logprobs", rows),
                   "value": self._scatter("value", "values", rows),
                   "reward": self._scatter("reward", "scores", rows)}
        out = {g: self._gather(g, p) for g, p in pending.items()}
        logprobs = padded([o["logprobs"] for o in out["policy"]])
        ref_logprobs = padded([o["logprobs"] for o in out["reference"]])
        values = padded(out["value"])
        mask = padded([torch.ones(len(r)) for r in rollout["response"]])
        scores = torch.tensor(out["reward"])
        eos = torch.tensor(rollout["eos"])
        rewards, kl, non_score = compute_rewards(
            clip_and_normalize_score(scores, clip=cfg.score_clip), logprobs, ref_logprobs, mask, self.kl_ctl.value,
            cfg.kl.estimator, eos, cfg.missing_eos_penalty)
        advantages, returns = compute_gae(values, rewards, mask, cfg.gamma, cfg.lam)
        advantages = masked_whiten(advantages, mask)
        lengths = mask.sum(1)
        metrics = {  # kl: per sequence (summed over its tokens), kl_per_token: token mean
            "objective/scores": scores.mean().item(), "objective/kl": kl.sum(1).mean().item(),
            "objective/kl_per_token": masked_mean(kl, mask).item(),
            "objective/non_score_reward": non_score.sum(1).mean().item(),
            "objective/rlhf_reward": (scores + non_score.sum(1)).mean().item(),
            "objective/entropy": sum(o["entropy"] for o in out["policy"]) / lengths.sum().item(),
            "val/mean": masked_mean(values, mask).item(), "response/length": lengths.mean().item(),
            "response/eos_rate": eos.float().mean().item(), "kl_coef": self.kl_ctl.value}
        if self.gold is not None:
            metrics["gold/score"] = statistics.mean(map(self.gold, rollout["prompt_text"], rollout["text"]))
        return {"rows": rows, "mask": mask, "logprobs": logprobs, "values": values, "advantages": advantages,
                "returns": returns, "metrics": metrics, "kl": metrics["objective/kl"]}

    def train(self, exp: Dict[str, Any], step: int) -> Dict[str, float]:
        """ppo_epochs passes of num_minibatches optimizer steps on both trained groups at once."""
        from rlhf.ppo_math import explained_variance

        cfg, mask, n = self.cfg, exp["mask"], len(exp["rows"])
        lengths = mask.sum(1).long().tolist()
        sums, tokens = {"policy": {}, "value": {}}, 0.0
        fields = {"policy": {"old_logprobs": "logprobs", "advantages": "advantages"},
                  "value": {"old_values": "values", "returns": "returns"}}
        for epoch in range(cfg.ppo_epochs):
            order = np.random.default_rng([cfg.seed, step, epoch]).permutation(n).tolist()
            for mb in range(cfg.num_minibatches):
                idx = order[mb * n // cfg.num_minibatches:(mb + 1) * n // cfg.num_minibatches]
                # The minibatch's token count over all ranks: each rank's loss is its share of one mean.
                num_tokens = float(sum(lengths[i] for i in idx))
                tokens += num_tokens
                pending = {g: self._scatter(g, "train_minibatch", [
                    dict(exp["rows"][i], **{k: exp[src][i, : lengths[i]] for k, src in f.items()}) for i in idx],
                    num_tokens=num_tokens) for g, f in fields.items()}
                for g, (refs, _) in pending.items():
                    for part in self.groups[g].get(refs):
                        for k, v in part.items():
                            sums[g][k] = sums[g].get(k, 0.0) + v
        steps = cfg.ppo_epochs * cfg.num_minibatches
        p, v = sums["policy"], sums["value"]
        return {"loss/policy": p["loss"] / steps, "loss/value": v["loss"] / steps,
                "policy/clipfrac": p["clipfrac"] / tokens, "policy/approxkl": p["approx_kl"] / tokens,
                "policy/ratio": p["ratio"] / tokens, "val/clipfrac": v["vf_clipfrac"] / tokens,
                "val/explained_variance": explained_variance(exp["values"], exp["returns"], mask).item()}

    def step(self, step: int) -> Dict[str, float]:
        t0 = time.perf_counter()
        rollout = self.rollout(step)
        t1 = time.perf_counter()
        exp = self.experience(rollout)
        t2 = time.perf_counter()
        metrics = dict(exp["metrics"], **self.train(exp, step))
        t3 = time.perf_counter()
        self.kl_ctl.update(exp["kl"], self.cfg.rollout_batch_size)
        generated = float(exp["mask"].sum())
        seq_tokens = generated + sum(len(p) for p in rollout["prompt"])
        metrics.update({"time/generate": t1 - t0, "time/inference": t2 - t1, "time/train": t3 - t2,
                        "time/step": t3 - t0, "tokens/s_generate": generated / (t1 - t0),
                        "tokens/s_train": seq_tokens * self.cfg.ppo_epochs / (t3 - t2),
                        # tokens through the policy's training forward/backward this step
                        "tokens": float(seq_tokens * self.cfg.ppo_epochs)})
        return metrics

    # -- evaluation, checkpoints, export ----------------------------------------------------------

    def evaluate(self, prefix: str = "eval") -> Dict[str, float]:
        """Gold score (95% bootstrap CI) and per-sequence KL to the reference on held-out prompts."""
        cfg = self.cfg
        if not cfg.eval_prompts:
            return {}
        out = self._sample("eval_rollout", cfg.eval_prompts)
        rows = [{"prompt": p, "response": r} for p, r in zip(out["prompt"], out["response"])]
        # k1 per sequence, sum over tokens of log pi - log pi_ref: unbiased for KL(pi || pi_ref).
        pending = [(g, self._scatter(g, "logprobs", rows, temperature=cfg.eval_sampling.temperature))
                   for g in ("policy", "reference")]  # both groups at once
        pol, ref = ([o["logprobs"] for o in self._gather(g, p)] for g, p in pending)
        kl = [float((a - b).sum()) for a, b in zip(pol, ref)]
        metrics = {"n": len(rows), "length": statistics.mean(len(r) for r in out["response"]),
                   "eos_rate": statistics.mean(map(float, out["eos"]))}
        metrics.update(zip(("kl", "kl_ci_low", "kl_ci_high"), mean_ci(kl, cfg.seed)))
        if self.gold is not None:
            gold = list(map(self.gold, out["prompt_text"], out["text"]))
            metrics.update(zip(("gold", "gold_ci_low", "gold_ci_high"), mean_ci(gold, cfg.seed)))
        metrics = {f"{prefix}/{k}": v for k, v in metrics.items()}
        metrics[f"{prefix}/examples"] = out["text"][:3]
        return metrics

    def save_checkpoint(self, step: int) -> None:
        state = {"kl_coef": self.kl_ctl.value, "start_eval": self.start_eval}
        refs = self.groups["policy"].call_async("save_checkpoint", step, state)
        self.groups["value"].get(self.groups["value"].call_async("save_checkpoint", step))
        self.groups["policy"].get(refs)

    def export(self, out_dir: str) -> None:
        self.groups["policy"].call("export", out_dir)

    def shutdown(self) -> None:
        from align.engine.ray_group import remove_shared_placement_group

        for group in self.groups.values():
            group.shutdown()
        self.groups = {}
        if self.pg is not None:
            remove_shared_placement_group(self.pg)
            self.pg = None


def run(cfg: PPOConfig, reuse: bool = True, group: Optional[str] = None) -> Dict[str, Any]:
    """Runs (or reuses) the PPO stage; returns its summary (also in DONE.json)."""
    from tqdm.auto import tqdm

    from align import run as runs
    from align.config import to_dict
    from align.data.sources import data_fingerprint
    from align.tracking import Tracker

    fingerprint = data_fingerprint([*cfg.data.train, *cfg.data.eval], cfg.seed)
    inputs = runs.identify_inputs({"policy": cfg.model.name_or_path, "reward_model": cfg.reward_model})
    if reuse and (done := runs.finished(cfg, fingerprint, inputs)) is not None:
        log.info("ppo: reusing the finished run in %s", cfg.run_dir)
        return dict(done, reused=True)
    run_dir = runs.prepare(cfg, "ppo", fingerprint, inputs)
    tracker = Tracker(cfg.tracking, run_dir.path, name=os.path.basename(os.path.abspath(cfg.run_dir)),
                      config=to_dict(cfg), group=group, job_type="ppo")
    started = time.time()
    trainer = PPOTrainer(cfg)
    try:
        total, start = cfg.train.max_steps, trainer.plan["start_step"]
        if start:
            log.info("ppo: resuming at step %d of %d", start, total)
        elif cfg.eval_at_start:
            trainer.start_eval = trainer.evaluate("eval_start")
            tracker.log(trainer.start_eval, 0)
        bar = tqdm(total=total, initial=start, desc="ppo", dynamic_ncols=True, disable=None)
        last: Dict[str, float] = {}
        train_tokens = 0.0
        for step in range(start + 1, total + 1):
            last = trainer.step(step)
            train_tokens += last.get("tokens", 0.0)
            bar.update(1)
            bar.set_postfix({k.split("/")[-1]: f"{last[k]:.3g}" for k in
                             ("objective/scores", "objective/kl", "gold/score") if k in last})
            if step % cfg.train.log_every == 0 or step == total:
                tracker.log(last, step)
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step != total:
                tracker.log(trainer.evaluate(), step)
            if cfg.train.save_every and step % cfg.train.save_every == 0 and step != total:
                trainer.save_checkpoint(step)
        bar.close()
        final = trainer.evaluate()
        tracker.log(final, total)
        trainer.export(run_dir.model)
        summary = {"stage": "ppo", "steps": total, "wall_time_s": round(time.time() - started, 2),
                   "train_tokens": train_tokens, "model_dir": run_dir.model, "final_train": last, "final_eval": final,
                   "start_eval": trainer.start_eval, "prompts": trainer.plan["prompts"],
                   "data_report": trainer.plan["data_report"]}
        tracker.summary({f"final/{k}": v for k, v in final.items() if isinstance(v, (int, float))})
        runs.finish(run_dir, summary)
        return summary
    finally:
        trainer.shutdown()
        tracker.finish()


def main(argv=None) -> int:
    from align.stage import stage_main

    return stage_main(argv, PPOConfig, run, "PPO against a reward model with a KL penalty to the SFT policy.")


if __name__ == "__main__":
    raise SystemExit(main())
