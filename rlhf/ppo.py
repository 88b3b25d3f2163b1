"""PPO from a reward model: the last stage of the RLHF pipeline (Ziegler et al. 2019, arXiv
1909.08593; InstructGPT, arXiv 2203.02155).

Up to four groups of Ray actors (per-rank workers in rlhf/ppo_workers.py, the driver's side in
rlhf/rollout.py): the policy and the value model are trained, the reference (the SFT model) and
the reward model are frozen. The same stage runs the critic-free estimators (advantage.estimator:
grpo, dr_grpo, rloo, reinforce_pp; rlhf/advantages.py): they start no value group, and rewards
that need no reward model (reward.fns: gold, rules, user functions) start no reward group.
With LoRA (model.lora) the policy ranks compute the reference log-probs themselves, with their
adapter off (the base model exactly), so no reference group starts; the value model trains
LoRA plus its full score head, and when it starts from the reward model (value_model unset) it
serves the reward with its adapters off too, so PPO holds two model copies instead of four.
One PPO step (`PPO.step`):

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
from typing import Any, Dict, List, Optional

import torch

from align.config import ConfigError, DataConfig, SourceConfig, StageConfig, check_choice, check_positive
from align.data.collate import collate_rows
from align.data.sources import data_fingerprint
from align.generation import SamplingConfig
from align.metrics import train_tokens
from align.stage import OnDriver, Throughput, run_stage, stage_main
from reward_model.rewards import REWARD_MODEL, RewardConfig, RewardTerm
from rlhf.advantages import ADVANTAGE_ESTIMATORS, dynamic_sampling_filter
from rlhf.policy_loss import AGGREGATIONS, KL_MODES
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
    # Where the KL goes: "reward" (-beta * KL per token in the reward, as PPO), "loss" (beta * the
    # `estimator` KL as a loss term on the policy, GRPO eq. 4; use k3 there) or "off".
    mode: str = "reward"


@dataclass
class RewardGroupConfig(GroupConfig):
    # The reward terms, summed with their weights (reward_model/rewards.py): a rule (json_valid,
    # json_schema, python_compiles, number_match), "gold" (the built-in task's exact scorer),
    # "reward_model" (the `reward_model` directory, on this group's actors) or "pkg.module:fn".
    # The reward-model group starts only when a "reward_model" term is configured.
    fns: List[RewardTerm] = field(default_factory=lambda: [RewardTerm(fn=REWARD_MODEL)])


@dataclass
class AdvantageConfig:
    # gae (PPO, needs the value model) | grpo | dr_grpo | rloo | reinforce_pp (critic-free: no
    # value group is started). rlhf/advantages.py has the papers and equations.
    estimator: str = "gae"
    # GRPO's eps in (r - mean) / (std + eps).
    eps: float = 1e-6


@dataclass
class RolloutConfig:
    # K samples per prompt (the group of the group-relative estimators); rollout_batch_size counts
    # responses, so a step samples rollout_batch_size / K prompts.
    group_size: int = 1
    # DAPO dynamic sampling: drop the groups whose rewards are all equal (no gradient) and refill
    # with groups of new prompts, at most `max_refill_rounds` extra rollouts per step.
    dynamic_sampling: bool = False
    max_refill_rounds: int = 2
    # Old log-probs (and the entropy metric) from the sampler, which computes them while sampling
    # with the same weights, instead of a policy forward over the rollout. Falls back to the
    # forward where transformers samples (ZeRO-3, generation_backend=transformers, other
    # architectures). In fp32 they equal the forward's to ~1e-5; in bf16 to bf16's noise.
    logprobs_from_sampler: bool = True


@dataclass
class LossConfig:
    # token_mean | seq_mean_token_sum | seq_mean_token_mean (rlhf/policy_loss.py); unset = the
    # estimator's own (token_mean for gae, GRPO's seq_mean_token_mean, Dr. GRPO's token sum).
    aggregation: Optional[str] = None
    # PPO clip epsilon below / above 1 (DAPO's clip-higher: clip_high > clip_low); unset = clip_range.
    clip_low: Optional[float] = None
    clip_high: Optional[float] = None

def _default_ppo_data() -> DataConfig:
    return DataConfig(train=[SourceConfig(path="builtin:prompts")], eval=[SourceConfig(path="builtin:eval_prompts")],
                      max_length=128, max_prompt_length=48)


@dataclass
class PPOConfig(StageConfig):
    data: DataConfig = field(default_factory=_default_ppo_data)
    # `model` is the policy's start (the SFT model). The reward model's directory (reward-model
    # stage); needed only when a reward.fns term is "reward_model".
    reward_model: Optional[str] = None
    # The value model's start; the reward model by default. The reference; `model` by default.
    value_model: Optional[str] = None
    reference_model: Optional[str] = None
    # The policy ranks hold the frozen reference too and compute its log-probs, so no reference
    # group (one process less per rank: its interpreter, torch and DeepSpeed) at the price of the
    # reference forward running after the policy's instead of beside it. With model.lora the
    # policy ranks always serve it (their adapter off). The `reference` section's zero_stage
    # still applies to that copy.
    reference_on_policy: bool = False
    # The same for the reward model (when a reward.fns term is reward_model): the policy ranks
    # hold it and score the rollouts, so no reward group. With reference_on_policy, GRPO from a
    # reward model runs as one group. The `reward` section's zero_stage still applies to that copy.
    reward_on_policy: bool = False
    policy: GroupConfig = field(default_factory=GroupConfig)
    value: GroupConfig = field(default_factory=GroupConfig)
    reference: GroupConfig = field(default_factory=GroupConfig)
    reward: RewardGroupConfig = field(default_factory=RewardGroupConfig)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    # Put the four groups on one placement group, each asking a quarter of every bundle.
    colocate: bool = False
    # Responses per PPO step (all policy ranks together): rollout_batch_size / rollout.group_size prompts.
    rollout_batch_size: int = 32
    # Prompts per generate() call on a rank.
    generation_batch_size: int = 32
    # ZeRO-3 policy: gather the full weights on every rank for generation (fast); off, each
    # decoding step gathers layer by layer (slow, but the model never has to fit on one device).
    gather_for_generation: bool = True
    # auto: our K/V-buffer sampler (align.fast_generate) where the architecture allows and the
    # policy is not ZeRO-3; transformers: always transformers' generate.
    generation_backend: str = "auto"
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
        check_choice("kl.mode", self.kl.mode, list(KL_MODES))
        check_choice("advantage.estimator", self.advantage.estimator, list(ADVANTAGE_ESTIMATORS))
        check_choice("generation_backend", self.generation_backend, ["auto", "transformers"])
        if self.loss.aggregation is not None:
            check_choice("loss.aggregation", self.loss.aggregation, list(AGGREGATIONS))
        for key in ("clip_low", "clip_high"):
            if getattr(self.loss, key) is not None:
                check_positive(f"loss.{key}", getattr(self.loss, key))
        check_positive("rollout.group_size", self.rollout.group_size)
        check_positive("rollout.max_refill_rounds", self.rollout.max_refill_rounds, allow_zero=True)
        estimator = ADVANTAGE_ESTIMATORS[self.advantage.estimator]
        if estimator.needs_groups and self.rollout.group_size < 2:
            raise ConfigError(f"rollout.group_size: advantage.estimator={self.advantage.estimator} compares the "
                              f"K samples of a prompt; set K >= 2 (got {self.rollout.group_size})")
        if self.rollout.dynamic_sampling and self.rollout.group_size < 2:
            raise ConfigError("rollout.dynamic_sampling: drops groups of equal rewards; needs rollout.group_size >= 2")
        if self.rollout_batch_size % (self.rollout.group_size * self.policy.num_actors):
            raise ConfigError(f"rollout_batch_size ({self.rollout_batch_size}) must be a multiple of "
                              f"rollout.group_size x policy.num_actors ({self.rollout.group_size} x "
                              f"{self.policy.num_actors}): every rank samples whole groups")
        self.reward.fns = RewardConfig(fns=self.reward.fns).fns  # checks every term (names the key)
        if self.uses_value_model and not (self.value_model or self.reward_model):
            raise ConfigError("value_model: advantage.estimator=gae trains a value model, started from value_model "
                              "or reward_model; set one, or use a critic-free estimator (grpo, rloo, ...)")
        if self.kl.adaptive and self.kl.mode != "reward":
            raise ConfigError(f"kl.adaptive: adapts the KL coefficient in the reward; needs kl.mode=reward "
                              f"(got {self.kl.mode})")
        if self.model.lora.enabled and self.reference_model not in (None, self.model.name_or_path):
            raise ConfigError(f"reference_model: with model.lora the reference is the base model "
                              f"({self.model.name_or_path}) with the adapter off; unset reference_model or model.lora.r")
        if self.reward_on_policy and self.reward_on_value:
            raise ConfigError("reward_on_policy: with model.lora and a value model started from the reward model, "
                              "the value ranks already serve the reward (adapters off); unset reward_on_policy")
        if self.uses_reward_model and not self.reward_model:
            raise ConfigError("reward_model: a reward.fns term is 'reward_model'; set reward_model to the "
                              "reward-model stage's directory, or use other reward.fns (gold, a rule)")
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
        for name in ("policy", "value") if self.uses_value_model else ("policy",):
            if minibatch % getattr(self, name).num_actors:
                raise ConfigError(f"{name}.num_actors must divide the minibatch of {minibatch} rollouts")

    @property
    def uses_value_model(self) -> bool:
        return ADVANTAGE_ESTIMATORS[self.advantage.estimator].needs_value_model

    @property
    def adapter_reference(self) -> bool:
        """With LoRA the policy ranks serve the reference (their adapter off): no reference group."""
        return self.model.lora.enabled

    @property
    def reference_served_by_policy(self) -> bool:
        """No reference group: the policy ranks serve the reference (LoRA, or reference_on_policy)."""
        return self.adapter_reference or self.reference_on_policy

    @property
    def reward_on_value(self) -> bool:
        """With LoRA, a value model started from the reward model is the reward model with its
        adapters off (and its original score head): the value ranks serve the reward, no reward group."""
        return (self.model.lora.enabled and self.uses_value_model and self.uses_reward_model
                and self.value_model in (None, self.reward_model))

    @property
    def uses_reward_model(self) -> bool:
        return any(t.fn == REWARD_MODEL for t in self.reward.fns)

    @property
    def aggregation(self) -> str:
        return self.loss.aggregation or ADVANTAGE_ESTIMATORS[self.advantage.estimator].aggregation


class PPO:
    """The PPO half of a RolloutStage step: experience (KL-shaped rewards, GAE, whitening), the
    update's metrics and the KL controller. The stage owns the groups and moves the rows."""

    def __init__(self, cfg: PPOConfig):
        self.cfg = cfg
        self.throughput: Optional[Throughput] = None
        self.kl_ctl = (AdaptiveKLController(cfg.kl.coef, cfg.kl.target, cfg.kl.horizon) if cfg.kl.adaptive
                       else FixedKLController(cfg.kl.coef))

    def state_dict(self) -> Dict[str, Any]:
        return {"kl_coef": self.kl_ctl.value}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.kl_ctl.value = state.get("kl_coef", self.kl_ctl.value)

    def experience(self, stage, rollout: Dict[str, list], scores: Optional[torch.Tensor] = None) -> Dict[str, Any]:
        """The groups' forwards over the rollout, then here on the whole batch: rewards and the
        advantages of `advantage.estimator` (global: the driver holds every row; gae's are
        whitened as before). `scores` (B,): the rollout's rewards when already computed (dynamic
        sampling). {"rows", "trajectory", "metrics"}."""
        cfg = self.cfg
        out = stage.inference(rollout, scores)
        mask, logprobs, values, scores = out["mask"], out["logprobs"], out["values"], out["scores"]
        eos = torch.tensor(rollout["eos"])
        name = cfg.advantage.estimator
        # KL in the reward only in kl.mode=reward (k1 by default, as PPO always had it).
        coef = self.kl_ctl.value if cfg.kl.mode == "reward" else 0.0
        rewards, kl, non_score = compute_rewards(
            clip_and_normalize_score(scores, clip=cfg.score_clip), logprobs, out["ref_logprobs"], mask,
            coef, cfg.kl.estimator, eos, cfg.missing_eos_penalty)
        if name == "gae":
            advantages, returns = compute_gae(values, rewards, mask, cfg.gamma, cfg.lam)
            advantages = masked_whiten(advantages, mask)
        elif name == "reinforce_pp":
            advantages, returns = ADVANTAGE_ESTIMATORS[name].fn(rewards, mask, cfg.gamma)
            returns = None
        else:  # group estimators on the per-sequence reward (its KL summed in, in kl.mode=reward)
            fn = ADVANTAGE_ESTIMATORS[name].fn
            kwargs = {"eps": cfg.advantage.eps} if name == "grpo" else {}
            advantages, returns = fn((rewards * mask).sum(1), mask, cfg.rollout.group_size, **kwargs)
            returns = None
        lengths = mask.sum(1)
        metrics = {  # kl: per sequence (summed over its tokens), kl_per_token: token mean
            "objective/scores": scores.mean().item(), "objective/kl": kl.sum(1).mean().item(),
            "objective/kl_per_token": masked_mean(kl, mask).item(),
            "objective/non_score_reward": non_score.sum(1).mean().item(),
            "objective/rlhf_reward": (scores + non_score.sum(1)).mean().item(),
            "objective/entropy": out["entropy"] / lengths.sum().item(),
            "response/length": lengths.mean().item(),
            "response/eos_rate": eos.float().mean().item(), "kl_coef": self.kl_ctl.value}
        if values is not None:
            metrics["val/mean"] = masked_mean(values, mask).item()
        metrics.update({f"reward/{k}": statistics.mean(v) for k, v in out.get("reward_terms", {}).items()})
        if stage.gold is not None:
            metrics["gold/score"] = statistics.mean(map(stage.gold, rollout["prompt_text"], rollout["text"]))
        traj = Trajectory(mask=mask, logprobs=logprobs, ref_logprobs=out["ref_logprobs"], values=values,
                          scores=scores, rewards=rewards, advantages=advantages, returns=returns)
        return {"rows": out["rows"], "trajectory": traj, "metrics": metrics}

    def train(self, stage, exp: Dict[str, Any], step: int) -> Dict[str, float]:
        """ppo_epochs passes of num_minibatches optimizer steps on the policy (and value) groups."""
        traj = exp["trajectory"]
        sums, last, tokens = stage.update(exp["rows"], traj, step)
        steps = self.cfg.ppo_epochs * self.cfg.num_minibatches
        p = sums["policy"]
        metrics = {"loss/policy": p["loss"] / steps,
                   "policy/clipfrac": p["clipfrac"] / tokens, "policy/approxkl": p["approx_kl"] / tokens,
                   "policy/ratio": p["ratio"] / tokens}
        if "kl_loss" in p:
            metrics.update({"loss/kl": p["kl_loss"] / steps, "policy/kl": p["kl"] / tokens})
        if "value" in sums:
            v = sums["value"]
            metrics.update({"loss/value": v["loss"] / steps, "val/clipfrac": v["vf_clipfrac"] / tokens,
                            "val/explained_variance": explained_variance(traj.values, traj.returns,
                                                                         traj.mask).item()})
        # The last optimizer step's lr and gradient norm: policy/lr, policy/grad_norm, value/...
        metrics.update({f"{g}/{k}": x for g, m in last.items() for k, x in m.items()})
        return metrics

    def sample(self, stage, step: int):
        """The step's rollout, and with rollout.dynamic_sampling its scores: groups whose rewards
        are all equal are dropped and refilled from further rollouts (at most max_refill_rounds);
        a batch still short is topped up with dropped groups (zero advantage: no gradient)."""
        cfg = self.cfg
        rollout = stage.rollout(step)
        if not cfg.rollout.dynamic_sampling:
            return rollout, None, {}
        k, n = cfg.rollout.group_size, cfg.rollout_batch_size
        kept_rows: list = []
        dropped_rows: list = []
        dropped = 0
        for attempt in range(cfg.rollout.max_refill_rounds + 1):
            if attempt:  # a new seed and the next prompts of the data stream
                rollout = stage.rollout(step + 1000003 * attempt)
            scores = stage.score_rollout(rollout)["scores"]
            kept, n_dropped = dynamic_sampling_filter(scores, k)
            dropped += n_dropped
            keep = set(kept.tolist())
            rows = [({f: rollout[f][i] for f in rollout}, float(scores[i])) for i in range(len(scores))]
            kept_rows += [r for i, r in enumerate(rows) if i in keep]
            dropped_rows += [r for i, r in enumerate(rows) if i not in keep]
            if len(kept_rows) >= n:
                break
        rows = (kept_rows + dropped_rows)[:n]  # whole groups: both lists hold whole groups
        out = {f: [r[f] for r, _ in rows] for f in rows[0][0]}
        metrics = {"rollout/dropped_groups": float(dropped), "rollout/rounds": float(attempt + 1),
                   "rollout/zero_adv_groups": float(max(0, n - len(kept_rows)) // k)}
        return out, torch.tensor([s for _, s in rows]), metrics

    def step(self, stage, step: int) -> Dict[str, float]:
        """One PPO step: rollout, experience, update, then the KL controller; with its time split."""
        t0 = time.perf_counter()
        rollout, scores, sample_metrics = self.sample(stage, step)
        t1 = time.perf_counter()
        exp = self.experience(stage, rollout, scores)
        t2 = time.perf_counter()
        metrics = dict(exp["metrics"], **self.train(stage, exp, step), **sample_metrics)
        t3 = time.perf_counter()
        self.kl_ctl.update(exp["metrics"]["objective/kl"], self.cfg.rollout_batch_size)
        generated = float(exp["trajectory"].mask.sum())
        # The policy's update forwards every prompt+response row once per epoch (align.metrics).
        tokens = train_tokens(collate_rows(exp["rows"], 0)[0]) * self.cfg.ppo_epochs
        self.throughput = self.throughput or Throughput(t0)
        metrics.update({"time/generate": t1 - t0, "time/inference": t2 - t1, "time/train": t3 - t2,
                        "time/step": t3 - t0, "tokens/s_generate": generated / (t1 - t0),
                        "tokens/s_train": tokens / (t3 - t2), "tokens": tokens,
                        "tokens_per_s": self.throughput.tick(tokens)})
        return metrics


def start(cfg: PPOConfig):
    """The PPO stage's groups, started (rlhf/rollout.py RolloutStage) with the PPO algorithm."""
    from rlhf.rollout import RolloutStage  # Ray and the models: not for config-only imports

    return RolloutStage(cfg, PPO(cfg))


def run(cfg: PPOConfig, reuse: bool = True, group: Optional[str] = None) -> Dict[str, Any]:
    """Runs (or reuses) the PPO stage; returns its summary (also in DONE.json)."""
    fingerprint = data_fingerprint([*cfg.data.train, *cfg.data.eval], cfg.seed)
    inputs = {"policy": cfg.model.name_or_path}
    if cfg.uses_reward_model:
        inputs["reward_model"] = cfg.reward_model
    return run_stage("ppo", cfg, OnDriver(start), fingerprint, inputs=inputs, group_name=group, reuse=reuse)


def main(argv=None) -> int:
    return stage_main(argv, PPOConfig, run, "PPO against a reward model with a KL penalty to the SFT policy.")


if __name__ == "__main__":
    raise SystemExit(main())
