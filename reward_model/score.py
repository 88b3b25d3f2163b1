"""Scoring with a trained reward model, from Python (PPO, evaluation) or the command line.

Prompts and responses are encoded exactly as the data layer encodes training pairs (the model
dir's tokenizer and chat template, responses ending in EOS), and each sequence is scored at its
last token. By default scores are normalised, (r - reward_mean) / reward_std, with the eval-split
statistics that the reward-model stage stored in the model's config.json.

    scorer = RewardScorer.from_pretrained("runs/reward_model/model")
    scorer.score(["Review the movie Iron Road."], ["The plot was great."])  # -> [1.73]

    python -m reward_model.score MODEL_DIR --input rows.jsonl [--output scored.jsonl] [--no-normalize]

Input rows are {"prompt": str or chat messages, "response": str}; output rows are the input
rows with a "score" field. Texts are not truncated (the model's position limit applies).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, List, Optional, Sequence

import torch

from align.config import DataConfig, ModelConfig
from align.data.collate import collate_sft
from align.data.errors import DataError, RowProblem
from align.data.formats import check_text, prompt_of
from align.data.tokenize import encode_prompts, encode_responses, uses_chat_template
from align.models.builders import build_scalar_model, build_tokenizer, sequence_scores
from reward_model.loss import normalize_rewards, reward_normalization

log = logging.getLogger("reward_model.score")


class RewardScorer:
    """A reward model with its tokenizer and normalisation, for batched scoring."""

    def __init__(self, model, tokenizer, mean: Optional[float] = None, std: Optional[float] = None,
                 normalize: bool = True, use_chat_template: bool = True):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.mean, self.std, self.use_chat_template = mean, std, use_chat_template
        self.normalize = normalize and mean is not None and std is not None
        if normalize and not self.normalize:
            log.warning("the model's config has no reward_mean/reward_std; scores are not normalised")

    @classmethod
    def from_pretrained(cls, model_dir: str, device: Optional[str] = None, normalize: bool = True,
                        use_chat_template: bool = True, revision: Optional[str] = None,
                        trust_remote_code: bool = False) -> "RewardScorer":
        """Loads a reward model saved by the reward-model stage (or any one-label
        sequence-classification model) through align.models.builders; `device` defaults to the
        GPU when there is one."""
        if model_dir.startswith((".", "/", "~")) and not os.path.isdir(os.path.expanduser(model_dir)):
            raise OSError(f"{model_dir}: no such model directory")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        # Scored as saved: padded batches, fp32, no varlen attention switch.
        model_cfg = ModelConfig(name_or_path=model_dir, revision=revision, trust_remote_code=trust_remote_code,
                                padding_free=False)
        tokenizer = build_tokenizer(model_cfg)
        model = build_scalar_model(model_cfg, tokenizer).to(device)
        if model.config.num_labels != 1:
            raise ValueError(f"{model_dir}: a reward model has one output, this one has {model.config.num_labels}")
        stats = reward_normalization(model.config, default=None)
        mean, std = stats if stats is not None else (None, None)
        return cls(model, tokenizer, mean, std, normalize, use_chat_template)

    def encode(self, prompts: Sequence[Any], responses: Sequence[str]) -> List[List[int]]:
        """Token ids of prompt + response + EOS, as the data layer builds training rows.

        Raises DataError (a ValueError) naming the row and field of a bad prompt or response.
        """
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        messages, texts = [], []
        for i, (prompt, response) in enumerate(zip(prompts, responses)):
            try:
                m, t = prompt_of(prompt, "prompt")
                check_text(response, "response")
            except RowProblem as p:
                raise DataError("inputs", p.problem, row=i, field=p.field, reason=p.reason) from None
            messages.append(m)
            texts.append(t)
        chat = uses_chat_template(self.tokenizer, DataConfig(use_chat_template=self.use_chat_template))
        prompt_ids = encode_prompts(self.tokenizer, messages, texts, chat)
        return [p + r for p, r in zip(prompt_ids, encode_responses(self.tokenizer, list(responses)))]

    @torch.no_grad()
    def score(self, prompts: Sequence[Any], responses: Sequence[str], batch_size: int = 16) -> List[float]:
        """One score per (prompt, response); prompts are strings or chat message lists."""
        ids = self.encode(prompts, responses)
        device = next(self.model.parameters()).device
        out: List[float] = []
        for start in range(0, len(ids), batch_size):
            rows = [{"input_ids": s, "loss_mask": [1] * len(s)} for s in ids[start:start + batch_size]]
            batch = collate_sft(rows, self.tokenizer.pad_token_id)
            r = sequence_scores(self.model, batch["input_ids"].to(device), batch["attention_mask"].to(device))
            if self.normalize:
                r = normalize_rewards(r, self.mean, self.std)
            out += r.float().cpu().tolist()
        return out


def read_rows(path: str) -> List[dict]:
    """Rows of a JSONL file with `prompt` and `response`; DataError names file, row and field."""
    rows = []
    try:
        with open(path, encoding="utf-8") as fh:
            lines = [line for line in fh if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(path, f"cannot be read: {err}") from None
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(path, f"not valid JSON: {err}", row=i) from None
        if not isinstance(row, dict):
            raise DataError(path, f"expected a JSON object, got {type(row).__name__}", row=i)
        for field in ("prompt", "response"):
            if row.get(field) is None:
                raise DataError(path, "missing", row=i, field=field, reason="missing_field")
        rows.append(row)
    if not rows:
        raise DataError(path, "empty file (no rows)")
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Score {prompt, response} rows with a reward model.")
    parser.add_argument("model_dir", help="reward model directory (the reward-model stage's model/)")
    parser.add_argument("--input", required=True, help="JSONL file of {prompt, response} rows")
    parser.add_argument("--output", help="JSONL file to write (default: stdout); rows gain a 'score'")
    parser.add_argument("--no-normalize", action="store_true", help="raw scores, without (r - mean) / std")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default=None, help="e.g. cpu or cuda:0 (default: cuda when available)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    try:
        rows = read_rows(args.input)
        scorer = RewardScorer.from_pretrained(args.model_dir, args.device, normalize=not args.no_normalize)
        try:
            scores = scorer.score([r["prompt"] for r in rows], [r["response"] for r in rows], args.batch_size)
        except DataError as err:  # a malformed prompt or response: name the file too
            raise DataError(args.input, err.problem, err.row, err.field, err.reason) from None
    except (DataError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    try:
        for row, s in zip(rows, scores):
            out.write(json.dumps(dict(row, score=s)) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
