"""Critic-free RL in the PPO stage (GRPO, RLOO, REINFORCE++): config checks, which groups start,
and a GRPO run on the default task's gold reward from the session's SFT policy (tiny-1m).

The GRPO run starts only the policy and the reference (no value model, no reward model); its
rewards are the gold scorer's values of the sampled texts, its advantages the pure
rlhf/advantages.grpo of those rewards over the K samples of each prompt, and one update moves
the policy's log-probs towards the positive-advantage responses.
"""

import math
import statistics

import pytest
import torch

from align.config import load_config

GRPO = "configs/ppo/grpo.yaml"


def constant_reward(prompts, responses, extras):
    return [0.5] * len(responses)


@pytest.mark.parametrize("path, overrides, groups", [
    ("configs/ppo/default.yaml", [], ("policy", "value", "reference", "reward")),
    (GRPO, [], ("policy", "reference")),
    (GRPO, ["reference_on_policy=true"], ("policy",)),
    ("configs/ppo/rloo.yaml", [], ("policy", "reference")),
    ("configs/ppo/reinforce_pp.yaml", [], ("policy", "reference")),
    # A reward-model term brings the reward group back, not the value group.
    (GRPO, ["reward_model=/rm", "reward.fns=[{fn: gold}, {fn: reward_model, weight: 0.5}]"],
     ("policy", "reference", "reward")),
    # ... unless the policy ranks hold both frozen models: GRPO from a reward model as one group.
    (GRPO, ["reward_model=/rm", "reward.fns=[{fn: reward_model}]", "reference_on_policy=true",
            "reward_on_policy=true"], ("policy",)),
])
def test_groups_for_starts_value_and_reward_groups_only_when_needed(path, overrides, groups):
    from rlhf.ppo import PPOConfig
    from rlhf.rollout import groups_for

    cfg = load_config(PPOConfig, path, ["model.name_or_path=/m", *overrides])
    assert groups_for(cfg) == groups


@pytest.mark.parametrize("override, message", [
    ("advantage.estimator=ppo", "advantage.estimator"),
    ("rollout.group_size=1", "rollout.group_size"),
    ("rollout.group_size=3", "rollout.group_size x policy.num_actors"),
    ("loss.aggregation=mean", "loss.aggregation"),
    ("kl.mode=both", "kl.mode"),
    ("loss.clip_high=-0.1", "loss.clip_high"),
    ("reward.fns=[{fn: reward_model}]", "reward_model"),
    ("reward.fns=[{fn: nosuchrule}]", r"reward.fns\[0\].fn"),
    ("advantage.estimator=gae", "value_model"),
    ("kl.adaptive=true", "kl.adaptive"),
])
def test_critic_free_config_errors_name_the_key(override, message):
    from align.config import ConfigError
    from rlhf.ppo import PPOConfig

    with pytest.raises(ConfigError, match=message):
        load_config(PPOConfig, GRPO, ["model.name_or_path=/m", override])


def test_dynamic_sampling_needs_groups():
    from align.config import ConfigError
    from rlhf.ppo import PPOConfig

    with pytest.raises(ConfigError, match="rollout.dynamic_sampling"):
        load_config(PPOConfig, "configs/ppo/reinforce_pp.yaml", ["model.name_or_path=/m",
                                                                  "rollout.dynamic_sampling=true"])


def grpo_overrides(sft_model_dir, **extra):
    return {"model.name_or_path": sft_model_dir, "train.max_steps": 2, "train.save_every": 0,
            "sampling.max_new_tokens": 24, "eval_prompts": 0, "eval_at_start": False,
            "ppo_epochs": 1, "num_minibatches": 1, "optim.lr": 1e-3, **extra}


@pytest.fixture(scope="module")
def grpo_first_step(sft_model_dir, quick, tmp_path_factory):
    """A GRPO stage's first step driven by hand (rollout, experience, one update), then a
    dynamic-sampling rollout; the stage is shut down before the assertions run."""
    from reward_model.rewards import CombinedReward
    from rlhf import ppo
    from rlhf.ppo import PPOConfig

    cfg = load_config(PPOConfig, GRPO, quick(tmp_path_factory.mktemp("grpo"), **grpo_overrides(sft_model_dir)))
    stage = ppo.start(cfg)
    algo = stage.algorithm
    try:
        groups = sorted(stage.groups)
        rollout = stage.rollout(1)
        exp = algo.experience(stage, rollout)
        policy = stage.groups["policy"]
        forward = policy.gather(policy.scatter("logprobs", exp["rows"], entropy=True))  # before the update
        train = algo.train(stage, exp, 1)
        after = stage.logprobs(exp["rows"])
        cfg.rollout.dynamic_sampling = True
        dynamic = algo.sample(stage, 2)
        # A reward that is the same for every response: every group is dropped, in all 3 rounds.
        stage.reward_fn = CombinedReward([("constant", 1.0, constant_reward)])
        constant = algo.sample(stage, 3)
        return {"groups": groups, "rollout": rollout, "exp": exp, "forward": forward, "train": train, "after": after,
                "gold": stage.gold, "dynamic": dynamic, "constant": constant}
    finally:
        stage.shutdown()


@pytest.mark.usefixtures("ray_session")
def test_grpo_starts_policy_and_reference_only_and_computes_group_advantages(grpo_first_step):
    from rlhf.advantages import grpo

    out = grpo_first_step
    assert out["groups"] == ["policy", "reference"]
    rollout, traj = out["rollout"], out["exp"]["trajectory"]
    # 32 responses: 8 prompts x K=4, each prompt's samples consecutive.
    assert len(rollout["prompt"]) == 32
    assert all(rollout["prompt"][4 * g] == rollout["prompt"][4 * g + j] for g in range(8) for j in range(4))
    # The reward is the gold scorer of the sampled text (no reward model).
    gold = torch.tensor([out["gold"](p, t) for p, t in zip(rollout["prompt_text"], rollout["text"])])
    torch.testing.assert_close(traj.scores, gold.to(traj.scores.dtype))
    # kl.mode=loss: no KL in the reward, so the advantages are the pure GRPO ones of the scores.
    expected, _ = grpo(traj.scores, traj.mask, 4, eps=1e-6)
    torch.testing.assert_close(traj.advantages, expected)
    assert traj.values is None and traj.returns is None
    # Hand check of one group: (r - mean) / (unbiased std + eps) on every token of the response.
    r = traj.scores[:4].double()
    if float(r.std()) > 0:
        want = (r - r.mean()) / (r.std() + 1e-6)
        assert float(traj.advantages[0, 0]) == pytest.approx(float(want[0]), rel=1e-5, abs=1e-6)
    assert out["exp"]["metrics"]["gold/score"] == pytest.approx(float(gold.mean()), abs=1e-6)


@pytest.mark.usefixtures("ray_session")
def test_old_logprobs_come_from_the_sampler_and_equal_the_policy_forward(grpo_first_step):
    """rollout.logprobs_from_sampler (the default): the rollout carries each token's log-prob and
    each response's entropy from the sampler, the experience uses them instead of a policy
    forward, and they equal that forward's (fp32) before the update."""
    out = grpo_first_step
    rollout, traj, forward = out["rollout"], out["exp"]["trajectory"], out["forward"]
    assert len(rollout["sampler_logprobs"]) == len(rollout["response"]) == len(forward)
    for i, (sampled, fwd) in enumerate(zip(rollout["sampler_logprobs"], forward)):
        n = len(rollout["response"][i])
        assert sampled.shape == (n,)
        torch.testing.assert_close(sampled, fwd["logprobs"], atol=2e-5, rtol=0)
        torch.testing.assert_close(traj.logprobs[i, :n], sampled)
        assert rollout["sampler_entropy"][i] == pytest.approx(fwd["entropy"], rel=1e-4, abs=1e-4)
    tokens = float(traj.mask.sum())
    assert out["exp"]["metrics"]["objective/entropy"] == pytest.approx(
        sum(f["entropy"] for f in forward) / tokens, rel=1e-4)
    assert float(traj.logprobs.sum()) < -1  # real sampled tokens, not certain ones


@pytest.mark.usefixtures("ray_session")
def test_grpo_update_moves_policy_towards_better_responses(grpo_first_step):
    out = grpo_first_step
    traj, train = out["exp"]["trajectory"], out["train"]
    assert "loss/value" not in train and "value/grad_norm" not in train
    # First update: the policy is the reference, so the k3 KL term is 0; ratio 1 everywhere.
    assert train["policy/kl"] == pytest.approx(0.0, abs=1e-6)
    assert train["policy/ratio"] == pytest.approx(1.0, abs=1e-5)
    # seq_mean_token_mean with ratio 1: loss = -mean_i A_i, 0 since GRPO advantages sum to 0 per group.
    assert train["loss/policy"] == pytest.approx(float(-traj.advantages[:, 0].mean()), abs=1e-5)
    assert math.isfinite(train["policy/grad_norm"]) and train["policy/grad_norm"] > 0
    # The update raised the mean log-prob of positive-advantage responses relative to the rest:
    # sum_i A_i * (mean_t new - mean_t old) > 0 (a first-order improvement of the surrogate).
    lengths = traj.mask.sum(1)
    delta = torch.stack([(a - traj.logprobs[i, : len(a)]).sum() / lengths[i] for i, a in enumerate(out["after"])])
    gain = float((traj.advantages[:, 0] * delta).sum())
    print(f"\nGRPO first update: sum_i A_i dlogp_i = {gain:.4f}, grad_norm {train['policy/grad_norm']:.3f}")
    assert gain > 0


@pytest.mark.usefixtures("ray_session")
def test_dynamic_sampling_keeps_groups_with_different_rewards(grpo_first_step):
    rollout, scores, metrics = grpo_first_step["dynamic"]
    assert len(rollout["prompt"]) == len(scores) == 32
    groups = scores.view(8, 4)
    spread = (groups.max(1).values - groups.min(1).values) > 0
    # Every group with all-equal rewards in the batch is a top-up, counted in zero_adv_groups.
    assert int((~spread).sum()) == metrics["rollout/zero_adv_groups"]
    assert metrics["rollout/dropped_groups"] >= metrics["rollout/zero_adv_groups"]
    assert 1 <= metrics["rollout/rounds"] <= 3
    print("\ndynamic sampling:", metrics, "mean reward", statistics.mean(scores.tolist()))
    # All-equal rewards: 8 groups dropped in each of the 1 + max_refill_rounds (2) rollouts; the
    # batch is then topped up with 8 dropped groups (zero advantage, no gradient).
    rollout, scores, metrics = grpo_first_step["constant"]
    assert len(rollout["prompt"]) == 32 and scores.tolist() == [0.5] * 32
    assert metrics == {"rollout/dropped_groups": 24.0, "rollout/rounds": 3.0, "rollout/zero_adv_groups": 8.0}
    assert all(rollout["prompt"][4 * g] == rollout["prompt"][4 * g + j] for g in range(8) for j in range(4))


def test_prompt_rows_carry_their_extra_fields_to_the_reward(builtin_tokenizer, tmp_path):
    """A prompt file's other fields reach the reward functions as one JSON text per row."""
    import json

    from align.config import DataConfig, SourceConfig
    from align.stage import load_tokenized
    from reward_model.rewards import RewardConfig, build_reward

    path = tmp_path / "prompts.jsonl"
    rows = [{"prompt": "Give Ann's record", "schema": {"name": "string", "age": "integer"}},
            {"prompt": "Say hi", "answer": 3}, {"prompt": "Nothing else"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = DataConfig(train=[SourceConfig(path=str(path))], eval=[], max_length=64, max_prompt_length=48)
    train, _, _ = load_tokenized(data, "prompt", builtin_tokenizer, 0)
    extras = {r["prompt_text"]: r["extras"] for r in train}
    assert json.loads(extras["Give Ann's record"]) == {"schema": {"name": "string", "age": "integer"}}
    assert json.loads(extras["Say hi"]) == {"answer": 3}
    assert extras["Nothing else"] == ""
    reward = build_reward(RewardConfig(fns=[{"fn": "json_schema"}]))
    got = reward(["Give Ann's record"] * 2, ['{"name": "Ann", "age": 31}', '{"name": "Ann", "age": "31"}'],
                 [json.loads(extras["Give Ann's record"])] * 2)
    assert got.total == [1.0, 0.5]


def test_online_labeller_accepts_the_rl_rules():
    from reward_model.labellers import LABELLERS, make_labeller

    assert {"json_valid", "json_schema", "python_compiles", "number_match"} <= set(LABELLERS)
    prompts = [[{"role": "user", "content": "Return JSON"}]] * 3
    assert make_labeller("json_valid", "builtin:prompts")(prompts, ['{"a": 1}', "no", '```json\n[1]\n```']) \
        == [1.0, 0.0, 1.0]
    assert make_labeller("python_compiles", "builtin:prompts")(prompts, ["x = 1", "def (:", ""]) == [1.0, 0.0, 0.0]


@pytest.mark.usefixtures("ray_session")
def test_grpo_update_is_the_same_on_two_ranks_with_more_micro_batches(grpo_first_step, sft_model_dir, quick,
                                                                      tmp_path_factory):
    """The 1-rank update (2 micro-batches of 16) replayed on a 2-rank ZeRO-2 policy with 4
    micro-batches of 4 per rank: seq_mean_token_mean's global normaliser gives the same loss,
    gradient norm and updated log-probs (float32 reduction order aside). The 2 policy ranks also
    hold the reference (reference_on_policy): no reference group, the same reference log-probs."""
    from rlhf import ppo
    from rlhf.ppo import PPOConfig

    one = grpo_first_step
    cfg = load_config(PPOConfig, GRPO, quick(tmp_path_factory.mktemp("grpo_two"), **grpo_overrides(
        sft_model_dir, **{"policy.num_actors": 2, "policy.zero_stage": 2, "deepspeed.micro_batch_size": 4,
                          "reference_on_policy": True})))
    two = ppo.start(cfg)
    try:
        assert sorted(two.groups) == ["policy"]
        exp = two.algorithm.experience(two, one["rollout"])
        train = two.algorithm.train(two, exp, 1)
        after = two.logprobs(exp["rows"])
    finally:
        two.shutdown()
    torch.testing.assert_close(exp["trajectory"].ref_logprobs, one["exp"]["trajectory"].ref_logprobs,
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(exp["trajectory"].advantages, one["exp"]["trajectory"].advantages)
    for key in ("loss/policy", "policy/grad_norm", "policy/ratio"):
        assert train[key] == pytest.approx(one["train"][key], rel=1e-3, abs=1e-5), key
    for a, b in zip(one["after"], after):
        torch.testing.assert_close(b, a, atol=2e-4, rtol=1e-3)
