"""Fixtures of the direct-preference stage tests: the SFT policy's own held-out gold score."""

import json
import os

import pytest

HELDOUT = 64  # held-out prompts sampled at the end of test runs (and for the SFT baseline)


@pytest.fixture(scope="session")
def sft_gold(sft_model_dir):
    """The SFT policy's sample report on the held-out prompts, sampled exactly as the stages'
    final evaluation samples (same prompts, settings and seed)."""
    import torch

    from align.config import load_config
    from align.models.builders import build_causal_lm, build_tokenizer
    from align.evaluation import held_out_report
    from align.stage import load_prompts
    from direct.dpo import DPOConfig

    cfg = load_config(DPOConfig, "configs/dpo/default.yaml", [f"model.name_or_path={sft_model_dir}"])
    tokenizer = build_tokenizer(cfg.model)
    model = build_causal_lm(cfg.model, tokenizer).eval()
    prompts = load_prompts(cfg.eval_prompts, cfg, tokenizer).select(range(HELDOUT))

    def generate(input_ids, attention_mask, **kwargs):
        with torch.no_grad():
            return model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    return held_out_report(generate, tokenizer, prompts, cfg.sampling, cfg.seed, [cfg.eval_prompts.path])


def _read_metrics(run_dir):
    out = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        for line in fh:
            row = json.loads(line)
            if "loss" in row:
                out[row["step"]] = row
    return out


@pytest.fixture(scope="session")
def read_metrics():
    """`read_metrics(run_dir)` -> {step: logged train metrics} (eval and final entries left out)."""
    return _read_metrics
