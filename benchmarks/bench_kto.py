"""KTO side by side: ours (direct.kto.run: 1 Ray actor, DeepSpeed ZeRO-0, fp32) against TRL's
KTOTrainer (use_cpu=True, loss_type "kto", fp32): same weights, rows, batches, hyperparameters.

    .venv/bin/python benchmarks/bench_kto.py        # ours, trl x 3 reps: about 6 min on 2 cores
    .venv/bin/python benchmarks/bench_kto.py --variants ours,ours-padded,trl    # about 10 min

Rows: `steps x micro_batch` {prompt, completion, label} rows of builtin:binary (one epoch),
micro-batch 16, beta 0.1, desirable/undesirable weights 1. Both precompute reference log-probs
(ours always; TRL with `precompute_ref_log_probs=True`) and both run a no-grad policy forward over
one mismatched (prompt, completion) row per row for the KL reference point z0.

The losses agree at step 1 only (0.5: policy = reference, z0 = 0). After it they differ by design:
TRL pairs row i with the completion of the previous row of its micro-batch, ours with a fixed
seeded derangement over the whole dataset (direct/kto.py explains why), so z0 is estimated on
different mismatched pairs. Tokens counted: the matched rows (the trained ones) only; MFU counts
the KL forward as 2 x params per matched token. "ours-padded" runs ours with
model.padding_free=false (padded batches, like TRL), "ours-nice15" with the actor at Ray's
default niceness 15 (harness.OUR_LABELS). Writes benchmarks/results/kto.md.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common as C  # noqa: E402
from benchmarks import harness as H  # noqa: E402

BETA = 0.1


def our_config(a):
    """Our KTO stage config, built in code."""
    from align.config import DeepSpeedConfig, ModelConfig, OptimConfig, RayConfig, TrackingConfig, TrainConfig
    from direct.kto import KTOConfig, KTOLossConfig

    return KTOConfig(model=ModelConfig(name_or_path=a.model), data=C.data_config(a.data), data_kind="binary",
                     loss=KTOLossConfig(beta=BETA), optim=OptimConfig(lr=H.LR, scheduler="constant"),
                     deepspeed=DeepSpeedConfig(zero_stage=0, micro_batch_size=a.micro_batch),
                     ray=RayConfig(num_actors=1, cpus_per_actor=float(os.cpu_count()), object_store_memory=256 * C.MIB),
                     tracking=TrackingConfig(backend="none"), train=TrainConfig(max_steps=a.steps, resume=False),
                     final_samples=0, reference_cache=os.path.join(a.tmp, "ref"), run_dir=os.path.join(a.tmp, "run"),
                     seed=C.SEED)


def child_ours(a) -> dict:
    from direct.kto import run

    return H.run_ours(a, run, our_config(a))


def child_trl(a) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import KTOConfig, KTOTrainer

    torch.set_num_threads(os.cpu_count())
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, attn_implementation="sdpa")
    args = H.trl_args(a, KTOConfig, beta=BETA, desirable_weight=1.0, undesirable_weight=1.0,
                      precompute_ref_log_probs=True)
    clock = H.clock_callback()
    trainer = KTOTrainer(model=model, args=args, train_dataset=H.trl_dataset(a), processing_class=tok,
                         callbacks=[clock])
    ds = trainer.train_dataset
    ids = [[list(p) + list(c)] for p, c in zip(ds["prompt_ids"], ds["completion_ids"])]
    return H.trl_train(a, trainer, clock, ids)


STAGE = H.Stage(
    name="kto", title="KTO: ours (direct.kto) vs TRL KTOTrainer", split="binary", kind="binary",
    children={**dict.fromkeys(H.OUR_LABELS, child_ours), "trl": child_trl},
    labels={**H.OUR_LABELS, "trl": "TRL, precomputed ref"},
    no_grad_forwards={"ours": 1, "trl": 1}, ours_counts_all_tokens=False, loss_steps=1,  # ours also counts the KL rows it forwards
    env=H.OUR_ENV,
    settings=f"KTO, beta {BETA}; tokens = matched rows; losses comparable at step 1 only (see the docstring).")

if __name__ == "__main__":
    H.main(STAGE, __doc__, steps=20, micro_batch=16, variants="ours,trl")
