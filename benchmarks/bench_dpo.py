"""DPO side by side: ours (direct.dpo.run: 1 Ray actor, DeepSpeed ZeRO-0, fp32) against TRL's
DPOTrainer (use_cpu=True, loss_type=["sigmoid"], fp32): same weights, rows, batches, hyperparameters.

    .venv/bin/python benchmarks/bench_dpo.py     # ours, ours-padded, trl, trl-ref x 3 reps: ~9 min on 2 cores
    .venv/bin/python benchmarks/bench_dpo.py --variants ours,ours-nice15,trl --out dpo_nice15   # a variant set of its own

Rows: `steps x micro_batch` pairs of builtin:preferences (one epoch), micro-batch 8 pairs = 16
sequences in one concatenated forward, beta 0.1. Our config is built in code (`our_config`);
cpus_per_actor = all cores, so our actor and TRL run torch with the same thread count.
Ours forwards each micro-batch padding-free, each pair's prompt once (chosen and rejected both
continue it: align.models.padding_free.pack_pairs); "ours-padded" runs ours with
model.padding_free=false (padded batches, like TRL), "ours-nice15" with the actor at Ray's
default niceness 15 (harness.OUR_LABELS).

The reference model. Ours always precomputes reference log-probs once before training
(direct.ref_cache, here into a fresh cache directory each run) and holds no reference model while
training. TRL runs both ways: `precompute_ref_log_probs=True` ("trl": the same design, so the fair
comparison of training speed) and its default ("trl-ref": a reference forward every step, what a
TRL user gets out of the box; its MFU counts that forward as 2 x params FLOPs per token). The
reference pass is start-up in both: outside the steady state, inside end-to-end wall time.
Writes benchmarks/results/dpo.md and dpo.json (or OUT.md, OUT.json). On the real model:

    .venv/bin/python benchmarks/bench_dpo.py --model builtin:smollm2-135m-instruct --variants ours,trl \
        --max-length 512 --max-prompt-length 256 --steps 8 --reps 1 --out dpo_smollm2

`--lora 16` trains a LoRA adapter (r 16, alpha 32, every linear layer but the head) in every
variant: ours through model.lora, TRL through a peft LoraConfig; both take the reference
log-probs from the model with its adapter off. `--bf16` runs every variant in bf16 (ours:
deepspeed.precision=bf16, TRL: bf16=True); MFU then counts against the bf16 matmul peak.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common as C  # noqa: E402
from benchmarks import harness as H  # noqa: E402

BETA = 0.1


def our_config(a):
    """Our DPO stage config, built in code: the benchmark's model, rows and settings."""
    from align.config import (DeepSpeedConfig, LoRAConfig, ModelConfig, OptimConfig, RayConfig, TrackingConfig,
                              TrainConfig)
    from direct.dpo import DPOConfig, LossConfig

    lora = LoRAConfig(**H.lora_settings(a.lora)) if a.lora else LoRAConfig()
    return DPOConfig(model=ModelConfig(name_or_path=a.model, lora=lora), data=C.data_config(a.data),
                     loss=LossConfig(name="dpo", beta=BETA), optim=OptimConfig(lr=H.LR, scheduler="constant"),
                     deepspeed=DeepSpeedConfig(zero_stage=0, micro_batch_size=a.micro_batch, precision=a.precision),
                     ray=RayConfig(num_actors=1, cpus_per_actor=float(os.cpu_count()), object_store_memory=256 * C.MIB),
                     tracking=TrackingConfig(backend="none"), train=TrainConfig(max_steps=a.steps, resume=False),
                     final_samples=0, reference_cache=os.path.join(a.tmp, "ref"), run_dir=os.path.join(a.tmp, "run"),
                     seed=C.SEED)


def child_ours(a) -> dict:
    from direct.dpo import run

    return H.run_ours(a, run, our_config(a))


def child_trl(a) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(os.cpu_count())
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, attn_implementation="sdpa")
    args = H.trl_args(a, DPOConfig, loss_type=["sigmoid"], beta=BETA, precompute_ref_log_probs=a.child == "trl")
    clock = H.clock_callback()
    peft_config = None
    if a.lora:  # with an adapter TRL's reference is the model with the adapter off, as ours
        from peft import LoraConfig

        lora = H.lora_settings(a.lora)
        peft_config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                 target_modules=lora["target_modules"], task_type="CAUSAL_LM")
        torch.manual_seed(C.SEED + 17)  # the adapters' A from the seed ours uses (align.models.lora)
    trainer = DPOTrainer(model=model, args=args, train_dataset=H.trl_dataset(a), processing_class=tok,
                         callbacks=[clock], peft_config=peft_config)
    ds = trainer.train_dataset
    ids = [[p + c, p + r] for p, c, r in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"])]
    return H.trl_train(a, trainer, clock, ids)


STAGE = H.Stage(
    name="dpo", title="DPO: ours (direct.dpo) vs TRL DPOTrainer", split="preferences", kind="pairwise",
    children={**dict.fromkeys(H.OUR_LABELS, child_ours), "trl": child_trl, "trl-ref": child_trl},
    labels={**H.OUR_LABELS, "trl": "TRL, precomputed ref",
            "trl-ref": "TRL, ref forward each step"},
    no_grad_forwards={"trl-ref": 1},
    env=H.OUR_ENV, shares_prompts=True, bf16=True,
    settings=f"DPO (sigmoid), beta {BETA}, micro-batch counted in pairs (2 sequences each); reference log-probs "
             "precomputed by ours and by 'TRL, precomputed ref'.")

if __name__ == "__main__":
    H.main(STAGE, __doc__, steps=20, micro_batch=8, variants="ours,ours-padded,trl,trl-ref")
