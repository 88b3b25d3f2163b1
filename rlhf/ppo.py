"""PPO from a reward model: the last stage of the RLHF pipeline (Ziegler et al. 2019, arXiv
1909.08593; InstructGPT, arXiv 2203.02155).

Four groups of Ray actors (per-rank workers in rlhf/ppo_workers.py, the driver's side in
rlhf/rollout.py): the policy and the value model are trained, the reference (the SFT model) and
the reward model are frozen. One PPO step (`PPO.step`):

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

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch
from omegaconf import MISSING

from align.config import ConfigError, DataConfig, SourceConfig, StageConfig, check_choice, check_positive
from align.data.sources import data_fingerprint
from align.generation import SamplingConfig
from align.stage import OnDriver, run_stage, stage_main
from rlhf.ppo_math import (AdaptiveKLController, FixedKLController, Trajectory, clip_and_normalize_score,
                           compute_gae, compute_rewards, explained_variance, masked_mean, masked_whiten)

# The config's sections of per-group settings (rlhf/rollout.py groups_for says which groups start).
GROUPS = ("policy", "value", "reference", "reward")


@dataclass
class GroupConfig:
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
    policy: GroupConfig = field(default_factory=GroupConfig)
    value: GroupConfig = field(default_factory=GroupConfig)
    reference: GroupConfig = field(default_factory=GroupConfig)
    reward: GroupConfig = field(default_factory=GroupConfig)
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
            group = getattr(self, name)
            check_positive(f"{name}.num_actors", group.num_actors)
            trained = name in ("policy", "value")
            check_choice(f"{name}.zero_stage", group.zero_stage, [0, 1, 2, 3] if trained else [0, 3])
            if group.offload and group.zero_stage == 0 or group.offload and not trained and group.zero_stage != 3:
                raise ConfigError(f"{name}.offload: needs zero_stage {'>= 1' if trained else '3'}")
        if self.rollout_batch_size % self.num_minibatches:
            raise ConfigError(f"rollout_batch_size ({self.rollout_batch_size}) must be a multiple of "
                              f"num_minibatches ({self.num_minibatches})")
        minibatch = self.rollout_batch_size // self.num_minibatches
        for name in ("policy", "value"):
            if minibatch % getattr(self, name).num_actors:
                raise ConfigError(f"{name}.num_actors must divide the minibatch of {minibatch} rollouts")


class PPO:
    """The PPO half of a RolloutStage step: experience (KL-shaped rewards, GAE, whitening), the
    update's metrics and the KL controller. The stage owns the groups and moves the rows."""

    def __init__(self, cfg: PPOConfig):
        self.cfg = cfg
        self.kl_ctl = (AdaptiveKLController(cfg.kl.coef, cfg.kl.target, cfg.kl.horizon) if cfg.kl.adaptive
                       else FixedKLController(cfg.kl.coef))

    def state_dict(self) -> Dict[str, Any]:
        return {"kl_coef": self.kl_ctl.value}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.kl_ctl.value = state.get("kl_coef", self.kl_ctl.value)

    def experience(self, stage, rollout: Dict[str, list]) -> Dict[str, Any]:
        """The groups' forwards over the rollout, then here on the whole batch: rewards, GAE and
        advantage whitening (global: the driver holds every row). {"rows", "trajectory", "metrics"}."""
        cfg = self.cfg
        out = stage.inference(rollout)
        mask, logprobs, values, scores = out["mask"], out["logprobs"], out["values"], out["scores"]
        eos = torch.tensor(rollout["eos"])
        rewards, kl, non_score = compute_rewards(
            clip_and_normalize_score(scores, clip=cfg.score_clip), logprobs, out["ref_logprobs"], mask,
            self.kl_ctl.value, cfg.kl.estimator, eos, cfg.missing_eos_penalty)
        advantages, returns = compute_gae(values, rewards, mask, cfg.gamma, cfg.lam)
        advantages = masked_whiten(advantages, mask)
        lengths = mask.sum(1)
        metrics = {  # kl: per sequence (summed over its tokens), kl_per_token: token mean
            "objective/scores": scores.mean().item(), "objective/kl": kl.sum(1).mean().item(),
            "objective/kl_per_token": masked_mean(kl, mask).item(),
            "objective/non_score_reward": non_score.sum(1).mean().item(),
            "objective/rlhf_reward": (scores + non_score.sum(1)).mean().item(),
            "objective/entropy": out["entropy"] / lengths.sum().item(),
            "val/mean": masked_mean(values, mask).item(), "response/length": lengths.mean().item(),
            "response/eos_rate": eos.float().mean().item(), "kl_coef": self.kl_ctl.value}
        if stage.gold is not None:
            metrics["gold/score"] = statistics.mean(map(stage.gold, rollout["prompt_text"], rollout["text"]))
        traj = Trajectory(mask=mask, logprobs=logprobs, ref_logprobs=out["ref_logprobs"], values=values,
                          scores=scores, rewards=rewards, advantages=advantages, returns=returns)
        return {"rows": out["rows"], "trajectory": traj, "metrics": metrics}

    def train(self, stage, exp: Dict[str, Any], step: int) -> Dict[str, float]:
        """ppo_epochs passes of num_minibatches optimizer steps on the policy and value groups."""
        traj = exp["trajectory"]
        sums, last, tokens = stage.update(exp["rows"], traj, step)
        steps = self.cfg.ppo_epochs * self.cfg.num_minibatches
        p, v = sums["policy"], sums["value"]
        metrics = {"loss/policy": p["loss"] / steps, "loss/value": v["loss"] / steps,
                   "policy/clipfrac": p["clipfrac"] / tokens, "policy/approxkl": p["approx_kl"] / tokens,
                   "policy/ratio": p["ratio"] / tokens, "val/clipfrac": v["vf_clipfrac"] / tokens,
                   "val/explained_variance": explained_variance(traj.values, traj.returns, traj.mask).item()}
        # The last optimizer step's lr and gradient norm: policy/lr, policy/grad_norm, value/...
        metrics.update({f"{g}/{k}": x for g, m in last.items() for k, x in m.items()})
        return metrics

    def step(self, stage, step: int) -> Dict[str, float]:
        """One PPO step: rollout, experience, update, then the KL controller; with its time split."""
        t0 = time.perf_counter()
        rollout = stage.rollout(step)
        t1 = time.perf_counter()
        exp = self.experience(stage, rollout)
        t2 = time.perf_counter()
        metrics = dict(exp["metrics"], **self.train(stage, exp, step))
        t3 = time.perf_counter()
        self.kl_ctl.update(exp["metrics"]["objective/kl"], self.cfg.rollout_batch_size)
        generated = float(exp["trajectory"].mask.sum())
        seq_tokens = generated + sum(len(p) for p in rollout["prompt"])
        metrics.update({"time/generate": t1 - t0, "time/inference": t2 - t1, "time/train": t3 - t2,
                        "time/step": t3 - t0, "tokens/s_generate": generated / (t1 - t0),
                        "tokens/s_train": seq_tokens * self.cfg.ppo_epochs / (t3 - t2),
                        # tokens through the policy's training forward/backward this step
                        "tokens": float(seq_tokens * self.cfg.ppo_epochs)})
        return metrics


def start(cfg: PPOConfig):
    """The PPO stage's groups, started (rlhf/rollout.py RolloutStage) with the PPO algorithm."""
    from rlhf.rollout import RolloutStage  # Ray and the models: not for config-only imports

    return RolloutStage(cfg, PPO(cfg))


def run(cfg: PPOConfig, reuse: bool = True, group: Optional[str] = None) -> Dict[str, Any]:
    """Runs (or reuses) the PPO stage; returns its summary (also in DONE.json)."""
    fingerprint = data_fingerprint([*cfg.data.train, *cfg.data.eval], cfg.seed)
    inputs = {"policy": cfg.model.name_or_path, "reward_model": cfg.reward_model}
    return run_stage("ppo", cfg, OnDriver(start), fingerprint, inputs=inputs, group_name=group, reuse=reuse)


def main(argv=None) -> int:
    return stage_main(argv, PPOConfig, run, "PPO against a reward model with a KL penalty to the SFT policy.")


if __name__ == "__main__":
    raise SystemExit(main())
