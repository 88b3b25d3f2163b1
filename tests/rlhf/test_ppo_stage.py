"""The PPO stage end to end on the default task: tiny-1m, 24-token responses, a few steps.

From the session's SFT policy and a reward model trained here by the reward-model stage:
PPO raises the gold score on held-out prompts well above the SFT policy's; a larger beta keeps
the policy closer to the reference; a 2-actor ZeRO-3 policy computes the same experience and the
same update as a 1-actor one on the same rollout; and a run resumes from its checkpoint.
"""

import json
import math
import os

import pytest
import torch

from align.config import load_config

STEPS = 12
STEP_METRICS = [
    "objective/scores", "objective/kl", "objective/kl_per_token", "objective/non_score_reward",
    "objective/entropy", "policy/clipfrac", "policy/approxkl", "loss/policy", "loss/value", "val/clipfrac",
    "val/explained_variance", "response/length", "kl_coef", "tokens/s_generate", "tokens/s_train",
    "time/generate", "time/inference", "time/train", "gold/score",
    "policy/grad_norm", "policy/lr", "value/grad_norm", "value/lr",
]


# ---------------------------------------------------------------------------------------------
# Pure pieces (no Ray): config checks, row splitting, response alignment
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, message", [
    ("kl.estimator=k4", "kl.estimator"),
    ("reference.zero_stage=2", "reference.zero_stage"),
    ("reward.offload=true", "reward.offload"),
    ("rollout_batch_size=31", "num_minibatches"),
    ("policy.num_actors=3", "policy.num_actors"),
])
def test_config_errors_name_the_key(override, message):
    from align.config import ConfigError
    from rlhf.ppo import PPOConfig

    with pytest.raises(ConfigError, match=message):
        load_config(PPOConfig, "configs/ppo/default.yaml", [override])


def test_response_view_reads_logprobs_and_values_at_the_right_positions(builtin_tokenizer):
    """Batched right-padded rows give each response token's log-prob (at P + t) and the value
    of the state before it (at P + t - 1), as one unpadded forward per row does."""
    from align.config import ModelConfig
    from align.models.builders import build_causal_lm, build_scalar_model, token_scalars
    from align.models.logprobs import sequence_logprobs
    from align.data.collate import collate_rows
    from rlhf.ppo_workers import response_mask, response_view

    lm = build_causal_lm(ModelConfig(), builtin_tokenizer, seed=1).eval()
    critic = build_scalar_model(ModelConfig(), builtin_tokenizer, seed=2).eval()
    rows = [{"prompt": [5, 6, 7], "response": [8, 9]}, {"prompt": [10], "response": [11, 12, 13, 14]}]
    batch, plens = collate_rows(rows, builtin_tokenizer.pad_token_id)
    mask = response_mask(rows)
    with torch.no_grad():
        lp = sequence_logprobs(lm, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
        got_lp = response_view(lp.token_logps, plens, mask.shape[1]) * mask
        got_v = response_view(token_scalars(critic, batch["input_ids"], batch["attention_mask"]), plens,
                              mask.shape[1], offset=-1) * mask
        for i, r in enumerate(rows):
            ids = torch.tensor([r["prompt"] + r["response"]])
            logp = torch.log_softmax(lm(ids).logits[0, :-1], -1)
            p, n = len(r["prompt"]), len(r["response"])
            want = logp[p - 1: p - 1 + n].gather(1, ids[0, p:, None]).squeeze(1)
            torch.testing.assert_close(got_lp[i, :n], want, atol=1e-5, rtol=1e-5)
            values = token_scalars(critic, ids, torch.ones_like(ids))[0]
            torch.testing.assert_close(got_v[i, :n], values[p - 1: p - 1 + n], atol=1e-5, rtol=1e-5)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]


# ---------------------------------------------------------------------------------------------
# The stage on Ray
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rm_dir(sft_model_dir, tmp_path_factory, quick):
    from reward_model import train

    cfg = load_config(train.RMConfig, "configs/reward_model/default.yaml", quick(
        tmp_path_factory.mktemp("rm"), **{"model.name_or_path": sft_model_dir, "train.max_steps": 60,
                                          "train.eval_every": 0, "train.save_every": 0}))
    return train.run(cfg, reuse=False)["model_dir"]


@pytest.fixture(scope="module")
def ppo_config(sft_model_dir, rm_dir, quick):
    from rlhf.ppo import PPOConfig

    def make(run_dir, **extra):
        base = {"model.name_or_path": sft_model_dir, "reward_model": rm_dir, "train.max_steps": STEPS,
                "train.save_every": 0, "rollout_batch_size": 32, "sampling.max_new_tokens": 24,
                "eval_sampling.max_new_tokens": 24, "eval_prompts": 128}
        base.update(extra)
        return load_config(PPOConfig, "configs/ppo/default.yaml", quick(run_dir, **base))

    return make


@pytest.fixture(scope="module")
def small_beta(ppo_config, tmp_path_factory):
    from rlhf import ppo

    cfg = ppo_config(tmp_path_factory.mktemp("ppo_small_beta"), **{"kl.coef": 0.05})
    return ppo.run(cfg, reuse=False), cfg.run_dir


@pytest.fixture(scope="module")
def large_beta(ppo_config, tmp_path_factory):
    """The beta = 0.5 run, driven step by step with the stage's driver-side object so that its
    first step (rollout, experience, update) can be replayed on a 2-actor ZeRO-3 policy."""
    from rlhf import ppo

    stage = ppo.start(ppo_config(tmp_path_factory.mktemp("ppo_large_beta"), **{"kl.coef": 0.5}))
    algo = stage.algorithm
    try:
        rollout = stage.rollout(1)
        exp = algo.experience(stage, rollout)
        first = {"rollout": rollout, "exp": exp, "train": algo.train(stage, exp, 1),
                 "after": stage.logprobs(exp["rows"])}
        for step in range(2, STEPS + 1):
            stage.train_step(step)
        return {"final_eval": stage.evaluate(final=True), "first": first}
    finally:
        stage.shutdown()


def _metrics(run_dir):
    from align.tracking import read_metrics

    return [r for r in read_metrics(run_dir) if "objective/kl" in r]


@pytest.mark.usefixtures("ray_session")
def test_ppo_raises_gold_score_above_sft(small_beta):
    summary, run_dir = small_beta
    before, after = summary["start_eval"], summary["final_eval"]
    print("\nSFT  gold %.3f [%.3f, %.3f]" % (before["eval_start/gold"], before["eval_start/gold_ci_low"],
                                           before["eval_start/gold_ci_high"]))
    print("PPO  gold %.3f [%.3f, %.3f]  KL %.2f [%.2f, %.2f]" % tuple(after[f"eval/{k}"] for k in (
        "gold", "gold_ci_low", "gold_ci_high", "kl", "kl_ci_low", "kl_ci_high")))
    assert after["eval/n"] == before["eval_start/n"] == 128
    # The 95% intervals do not overlap, and the gain is large on the task's [-1.5, 1.5] scale.
    assert after["eval/gold_ci_low"] > before["eval_start/gold_ci_high"]
    assert after["eval/gold"] - before["eval_start/gold"] > 0.4
    # The starting policy is the reference: zero KL; after training a clearly positive one.
    assert before["eval_start/kl"] == pytest.approx(0.0, abs=1e-4)
    assert 0.3 < after["eval/kl"] < 20.0


@pytest.mark.usefixtures("ray_session")
def test_ppo_logs_every_metric_and_exports(small_beta):
    from transformers import AutoModelForCausalLM

    summary, run_dir = small_beta
    rows = _metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for row in rows:
        for key in STEP_METRICS:
            assert math.isfinite(row[key]), (row["step"], key, row[key])
    # Step 1: the policy still equals the reference, so its rollout KL is zero.
    assert rows[0]["objective/kl"] == pytest.approx(0.0, abs=1e-4)
    assert rows[-1]["objective/kl"] > 0.1
    assert rows[-1]["objective/scores"] > rows[0]["objective/scores"]
    time_split = {k: round(rows[-1][k], 2) for k in ("time/generate", "time/inference", "time/train", "time/step")}
    print("\none PPO step (s):", time_split)
    model = AutoModelForCausalLM.from_pretrained(summary["model_dir"])
    assert model.num_parameters() > 0
    with open(os.path.join(run_dir, "DONE.json")) as fh:
        assert json.load(fh)["steps"] == STEPS


@pytest.mark.usefixtures("ray_session")
def test_larger_beta_keeps_policy_closer_to_reference(small_beta, large_beta):
    small, large = small_beta[0]["final_eval"], large_beta["final_eval"]
    print(f"\nKL to reference: beta 0.05 -> {small['eval/kl']:.2f}, beta 0.5 -> {large['eval/kl']:.2f}")
    assert large["eval/kl"] < small["eval/kl"]
    assert large["eval/kl_ci_high"] < small["eval/kl_ci_low"]


@pytest.mark.usefixtures("ray_session")
def test_two_actor_zero3_policy_matches_one_actor_and_resumes(ppo_config, large_beta, tmp_path_factory):
    """The 1-actor run's first rollout through a colocated 2-actor ZeRO-3 policy: the same old
    log-probs (its forward against the 1-actor sampler's), values, advantages, losses and updated
    policy (float32 reduction order aside); the 2 policy ranks also hold the reward model
    (reward_on_policy), so the same advantages say the same scores.
    Sampling itself differs with the number of ranks (each rank draws its share with its own
    generator), so the rollout is replayed rather than re-sampled. Then the stage resumes from
    the 2-actor checkpoint: one real ZeRO-3 step (generation included), evaluation, export."""
    from rlhf import ppo

    one = large_beta["first"]
    run_dir = tmp_path_factory.mktemp("ppo_two")
    cfg = ppo_config(run_dir, **{"kl.coef": 0.5, "policy.num_actors": 2, "policy.zero_stage": 3, "colocate": True,
                                 "ray.cpus_per_actor": 1, "deepspeed.param_persistence_threshold": 0,
                                 "eval_prompts": 16, "eval_at_start": False, "train.max_steps": 2,
                                 "reward_on_policy": True})
    two = ppo.start(cfg)
    assert sorted(two.groups) == ["policy", "reference", "value"]  # the policy ranks score the rollouts
    # Without the 1-actor sampler's log-probs, so the ZeRO-3 policy's own forward computes them.
    rollout = {k: v for k, v in one["rollout"].items() if not k.startswith("sampler_")}
    try:
        exp = two.algorithm.experience(two, rollout)
        train = two.algorithm.train(two, exp, 1)
        after = two.logprobs(exp["rows"])
        two.save_checkpoint(1)
    finally:
        two.shutdown()
    for key in ("logprobs", "values", "advantages", "returns"):
        torch.testing.assert_close(getattr(exp["trajectory"], key), getattr(one["exp"]["trajectory"], key),
                                   atol=2e-4, rtol=1e-3, msg=key)
    for key in ("loss/policy", "loss/value", "policy/approxkl", "policy/clipfrac", "val/clipfrac",
                "policy/grad_norm", "value/grad_norm"):
        assert train[key] == pytest.approx(one["train"][key], rel=2e-2, abs=2e-4), key
    for a, b in zip(one["after"], after):
        torch.testing.assert_close(b, a, atol=2e-3, rtol=1e-3)
    # ... and the update did move the policy, so that comparison means something.
    assert max(float((a - b[: len(a)]).abs().max())
               for a, b in zip(one["after"], one["exp"]["trajectory"].logprobs)) > 1e-3

    summary = ppo.run(cfg, reuse=False)
    rows = _metrics(run_dir)
    assert [r["step"] for r in rows] == [2]
    assert all(math.isfinite(rows[0][k]) for k in STEP_METRICS)
    assert math.isfinite(summary["final_eval"]["eval/gold"]) and summary["final_eval"]["eval/n"] == 16
    assert os.path.exists(os.path.join(summary["model_dir"], "model.safetensors"))
