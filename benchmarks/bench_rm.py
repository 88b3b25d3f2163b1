"""Reward model side by side: ours (reward_model.train.run: 1 Ray actor, DeepSpeed ZeRO-0, fp32)
against TRL's RewardTrainer (use_cpu=True, fp32): the same scalar-head model (builtin:tiny-30m
with a one-output head, saved once), rows, batches and hyperparameters.

    .venv/bin/python benchmarks/bench_rm.py         # ours, ours-padded, trl x 3 reps: about 6-8 min on 2 cores

Rows: `steps x micro_batch` pairs of builtin:preferences (one epoch), micro-batch 8 pairs = 16
sequences in one forward; Bradley-Terry loss -log sigmoid(r_chosen - r_rejected), no margin, no
centring, scores read at the last non-pad token in both. Ours forwards padding-free, each pair's
prompt once; "ours-padded" runs ours with model.padding_free=false (padded batches, like TRL),
"ours-nice15" with the actor at Ray's default niceness 15 (harness.OUR_LABELS).
Writes benchmarks/results/rm.md.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common as C  # noqa: E402
from benchmarks import harness as H  # noqa: E402


def our_config(a):
    """Our reward-model stage config, built in code."""
    from align.config import DeepSpeedConfig, ModelConfig, OptimConfig, RayConfig, TrackingConfig, TrainConfig
    from reward_model.train import RMConfig

    return RMConfig(model=ModelConfig(name_or_path=a.model), data=C.data_config(a.data),
                    optim=OptimConfig(lr=H.LR, scheduler="constant"),
                    deepspeed=DeepSpeedConfig(zero_stage=0, micro_batch_size=a.micro_batch),
                    ray=RayConfig(num_actors=1, cpus_per_actor=float(os.cpu_count()), object_store_memory=256 * C.MIB),
                    tracking=TrackingConfig(backend="none"), train=TrainConfig(max_steps=a.steps, resume=False),
                    run_dir=os.path.join(a.tmp, "run"), seed=C.SEED)


def child_ours(a) -> dict:
    from reward_model.train import run

    return H.run_ours(a, run, our_config(a))


def child_trl(a) -> dict:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    torch.set_num_threads(os.cpu_count())
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForSequenceClassification.from_pretrained(a.model, num_labels=1, dtype=torch.float32,
                                                               attn_implementation="sdpa")
    args = H.trl_args(a, RewardConfig, center_rewards_coefficient=None)
    clock = H.clock_callback()
    trainer = RewardTrainer(model=model, args=args, train_dataset=H.trl_dataset(a), processing_class=tok,
                            callbacks=[clock])
    ds = trainer.train_dataset
    ids = [[list(c), list(r)] for c, r in zip(ds["chosen_ids"], ds["rejected_ids"])]
    return H.trl_train(a, trainer, clock, ids)


STAGE = H.Stage(
    name="rm", title="Reward model: ours (reward_model.train) vs TRL RewardTrainer", split="preferences",
    kind="pairwise", scalar=True, children={**dict.fromkeys(H.OUR_LABELS, child_ours), "trl": child_trl},
    labels={**H.OUR_LABELS, "trl": "TRL"},
    env=H.OUR_ENV, shares_prompts=True,
    settings="Bradley-Terry reward model, micro-batch counted in pairs (2 sequences each).")

if __name__ == "__main__":
    H.main(STAGE, __doc__, steps=20, micro_batch=8, variants="ours,ours-padded,trl")
