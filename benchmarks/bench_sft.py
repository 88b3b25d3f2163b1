"""SFT side by side: ours (rlhf.sft.run: 1 Ray actor, DeepSpeed ZeRO-0, fp32) against TRL's
SFTTrainer (use_cpu=True, prompt-completion rows, loss on completion tokens only, fp32): same
weights, rows, batches and hyperparameters.

    .venv/bin/python benchmarks/bench_sft.py        # ours, ours-padded, trl x 3 reps: about 6-8 min on 2 cores

Rows: `steps x micro_batch` of builtin:sft (one epoch), micro-batch 16 sequences, no packing of
rows in either (TRL pads each micro-batch to its longest row). The loss is the mean NLL over the
response tokens (EOS included) of the batch in both. Ours forwards padding-free; "ours-padded"
runs ours with model.padding_free=false (padded batches, like TRL), "ours-nice15" with the actor
at Ray's default niceness 15 (harness.OUR_LABELS). Writes benchmarks/results/sft.md.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common as C  # noqa: E402
from benchmarks import harness as H  # noqa: E402


def our_config(a):
    """Our SFT stage config, built in code."""
    from align.config import DeepSpeedConfig, ModelConfig, OptimConfig, RayConfig, TrackingConfig, TrainConfig
    from rlhf.sft import SFTConfig

    return SFTConfig(model=ModelConfig(name_or_path=a.model), data=C.data_config(a.data),
                     optim=OptimConfig(lr=H.LR, scheduler="constant"),
                     deepspeed=DeepSpeedConfig(zero_stage=0, micro_batch_size=a.micro_batch),
                     ray=RayConfig(num_actors=1, cpus_per_actor=float(os.cpu_count()), object_store_memory=256 * C.MIB),
                     tracking=TrackingConfig(backend="none"), train=TrainConfig(max_steps=a.steps, resume=False),
                     final_samples=0, run_dir=os.path.join(a.tmp, "run"), seed=C.SEED)


def child_ours(a) -> dict:
    from rlhf.sft import run

    return H.run_ours(a, run, our_config(a))


def child_trl(a) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    torch.set_num_threads(os.cpu_count())
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, attn_implementation="sdpa")
    args = H.trl_args(a, SFTConfig, packing=False, completion_only_loss=True)
    clock = H.clock_callback()
    trainer = SFTTrainer(model=model, args=args, train_dataset=H.trl_dataset(a), processing_class=tok,
                         callbacks=[clock])
    ids = [[list(x)] for x in trainer.train_dataset["input_ids"]]
    return H.trl_train(a, trainer, clock, ids)


STAGE = H.Stage(
    name="sft", title="SFT: ours (rlhf.sft) vs TRL SFTTrainer", split="sft", kind="sft",
    children={**dict.fromkeys(H.OUR_LABELS, child_ours), "trl": child_trl},
    labels={**H.OUR_LABELS, "trl": "TRL"},
    env=H.OUR_ENV,
    settings="SFT on prompt-completion rows, loss on response tokens, no packing.")

if __name__ == "__main__":
    H.main(STAGE, __doc__, steps=20, micro_batch=16, variants="ours,ours-padded,trl")
