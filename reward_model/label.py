"""Preference data labelled from a model's own samples: the data-generation stage of a pipeline.

    align-run label --config configs/label/smollm2.yaml

The model samples K responses for each prompt of `data.train` (align.generation.sample_per_prompt,
seeded per chunk of prompts, so the same seed writes the same bytes whatever the number of
ranks), the configured rewards score them (`reward.fns`, the registry the RL stage uses: the
task's gold scorer, rules, a reward model, user functions; a prompt row's other fields reach
them as extras), and the stage writes, under `<run_dir>/data/`:

    pairs.jsonl     {prompt, chosen, rejected, chosen_score, rejected_score}: each prompt's best
                    and worst response (DPO; a reward model)
    binary.jsonl    {prompt, completion, label, score}: the same best (label true) and worst
                    (label false) as unpaired rows (KTO)
    rankings.jsonl  {prompt, responses, scores}: every distinct response with its score (a reward
                    model on all pairs, with `data.ties: strict_pairs`)
    samples.jsonl   {prompt, responses, scores}: all K samples of every prompt, as sampled and
                    scored, dropped prompts included (to read what the model wrote)

A prompt whose scores are all equal carries no preference: it is dropped and counted
(`label/dropped_tied`); responses the data layer would reject (empty, undecodable) and repeats
are left out first. Later
stages read the files through the pipeline's `inputs` (`data.train: label/pairs`). The stage's
model (its summary's `model_dir`) is the model it sampled from, unchanged, so a pipeline can take
it as every method's start and as the evaluation baseline. A stopped run starts again from the
first prompt (it keeps no checkpoints).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from align.config import ConfigError, DataConfig, SourceConfig, StageConfig, check_positive
from align.data.errors import RowProblem
from align.data.formats import check_text
from align.engine import deepspeed_engine as de
from align.errors import UserError
from align.generation import SamplingConfig, groups, sample_per_prompt
from align.models.builders import build_causal_lm, build_tokenizer
from align.stage import StageWorker, load_tokenized, model_inputs, run_recipe, stage_main
from reward_model.labellers import best_and_worst
from reward_model.rewards import REWARD_MODEL, RewardConfig, RewardTerm, build_reward

OUTPUTS = ("pairs", "binary", "rankings", "samples")


def output_path(run_dir: str, name: str) -> str:
    """Where the stage writes output `name` (one of OUTPUTS)."""
    return os.path.join(run_dir, "data", f"{name}.jsonl")


@dataclass
class LabelConfig(StageConfig):
    # data.train: the prompts ({prompt} or {messages} rows; a source's max_rows caps them).
    data: DataConfig = field(default_factory=lambda: DataConfig(
        train=[SourceConfig(path="builtin:prompts", max_rows=64)], max_length=96, max_prompt_length=48))
    # K: responses sampled per prompt; the best and the worst make its pair.
    samples_per_prompt: int = 4
    # High temperature gives the K samples room to differ (and so a preference).
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=1.0))
    # The label of a response: sum_k weight_k * fn_k (reward_model/rewards.py, as the RL stage).
    reward: RewardConfig = field(default_factory=lambda: RewardConfig(fns=[RewardTerm(fn="gold")]))
    # A reward-model directory, for a reward.fns term "reward_model".
    reward_model: Optional[str] = None
    # Prompts labelled per step (each gets K samples): the unit of the progress bar and metrics.
    prompts_per_step: int = 8

    def __post_init__(self) -> None:
        if self.samples_per_prompt < 2:
            raise ConfigError(f"samples_per_prompt: needs at least 2 responses to compare, got {self.samples_per_prompt}")
        check_positive("prompts_per_step", self.prompts_per_step)
        if not self.data.train:
            raise ConfigError("data.train: no prompt source to label")
        if self.data.eval or self.data.eval_fraction:
            raise ConfigError("data.eval: the label stage samples data.train's prompts only; leave data.eval "
                              "empty and data.eval_fraction 0")
        if any(t.fn == REWARD_MODEL for t in self.reward.fns) and not self.reward_model:
            raise ConfigError("reward_model: reward.fns has a 'reward_model' term; set reward_model to its directory")


def label_rows(prompts: Sequence[Any], responses: Sequence[Sequence[str]],
               scores: Sequence[Sequence[float]]) -> tuple:
    """(rows of each output, counts) from K scored responses per prompt; pure.

    Per prompt: responses the data layer would reject (empty, or with U+FFFD from a multi-byte
    character cut mid-token) and repeats (the first copy stays) are left out; if what is left
    has no two different scores, the prompt is dropped (`dropped_tied`), else its best and worst
    (`best_and_worst`) make a pair, two binary rows and, with every other distinct response, a
    ranking.
    """
    out: Dict[str, List[dict]] = {name: [] for name in OUTPUTS}
    counts = {"prompts": len(prompts), "dropped_tied": 0, "invalid_responses": 0, "repeated_responses": 0}
    for prompt, texts, values in zip(prompts, responses, scores):
        out["samples"].append({"prompt": prompt, "responses": list(texts), "scores": list(values)})
        kept: Dict[str, float] = {}
        for text, value in zip(texts, values):
            if not _valid_text(text):
                counts["invalid_responses"] += 1
            elif text in kept:
                counts["repeated_responses"] += 1
            else:
                kept[text] = value
        texts_kept, values_kept = list(kept), list(kept.values())
        picked = best_and_worst(values_kept) if len(kept) >= 2 else None
        if picked is None:
            counts["dropped_tied"] += 1
            continue
        best, worst = texts_kept[picked[0]], texts_kept[picked[1]]
        hi, lo = values_kept[picked[0]], values_kept[picked[1]]
        out["pairs"].append({"prompt": prompt, "chosen": best, "rejected": worst, "chosen_score": hi,
                             "rejected_score": lo})
        out["binary"].append({"prompt": prompt, "completion": best, "label": True, "score": hi})
        out["binary"].append({"prompt": prompt, "completion": worst, "label": False, "score": lo})
        out["rankings"].append({"prompt": prompt, "responses": texts_kept, "scores": values_kept})
    counts["pairs"] = len(out["pairs"])
    return out, counts


def _valid_text(text: str) -> bool:
    try:
        check_text(text, "response")
    except RowProblem:
        return False
    return True


def write_jsonl(path: str, rows: Sequence[dict]) -> None:
    """Rows as JSON lines, written to a temporary file and renamed (a reader never sees half)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    os.replace(tmp, path)


class LabelWorker(StageWorker):
    """One rank: samples and scores its chunks of prompts; rank 0 writes the files."""

    def __init__(self, cfg: LabelConfig):
        self.cfg = cfg
        de.seed_everything(cfg.seed)
        self.tokenizer = build_tokenizer(cfg.model)
        self.rows, _, self.report = load_tokenized(cfg.data, "prompt", self.tokenizer, cfg.seed)
        scorer = None
        if cfg.reward_model:
            from reward_model.score import RewardScorer

            scorer = RewardScorer.from_pretrained(cfg.reward_model, trust_remote_code=cfg.model.trust_remote_code)
        self.reward = build_reward(cfg.reward, [s.path for s in cfg.data.train], scorer)
        model = build_causal_lm(cfg.model, self.tokenizer, seed=cfg.seed)
        self.engine = de.init_eval_engine(model, cfg.deepspeed, cfg.optim)
        n, per = len(self.rows), cfg.prompts_per_step
        self.chunks = [list(range(s, min(s + per, n))) for s in range(0, n, per)]
        # Chunk c goes to rank c % world at step c // world: every rank takes the same number of
        # steps (ZeRO-3's generate is a collective), and a chunk's seed does not depend on the rank.
        self.total_steps = max(1, -(-len(self.chunks) // de.world_size()))
        self.labelled: List[tuple] = []  # (chunk index, prompts, K texts per prompt, K scores per prompt)
        self.files: Dict[str, List[dict]] = {}

    def plan(self) -> Dict[str, Any]:
        outputs = {name: output_path(self.cfg.run_dir, name) for name in OUTPUTS}
        return {"total_steps": self.total_steps, "start_step": 0, "progress_keys": ["label/score"],
                "summary": {"model_dir": self.cfg.model.name_or_path, "outputs": outputs,
                            "data_report": dict(self.report)}}

    def _prompt_field(self, row_index: int) -> Any:
        """The prompt as the source gave it: its text for a one-turn prompt, else its messages."""
        messages = self.rows[row_index]["messages"]
        one_turn = len(messages) == 1 and messages[0]["role"] == "user"
        return self.rows[row_index]["prompt_text"] if one_turn else messages

    def train_step(self) -> Dict[str, float]:
        cfg, k = self.cfg, self.cfg.samples_per_prompt
        index = self.step * de.world_size() + de.rank()
        self.step += 1
        idle = index >= len(self.chunks)  # the last step of an uneven split: generate in step, keep nothing
        rows = self.rows.select(self.chunks[0 if idle else index])
        out = sample_per_prompt(partial(de.generate, self.engine), self.tokenizer, rows["prompt_ids"], k,
                                cfg.sampling, micro_batch_size=cfg.deepspeed.micro_batch_size,
                                seed=cfg.seed * 100_003 + index, device=de.device())
        local = torch.zeros(4, dtype=torch.float64)
        if not idle:
            extras = [json.loads(e) if e else {} for e in rows["extras"] for _ in range(k)]
            prompt_texts = [p for p in rows["prompt_text"] for _ in range(k)]
            scores = self.reward(prompt_texts, out.texts, extras).total
            prompts = [self._prompt_field(i) for i in self.chunks[index]]
            self.labelled.append((index, prompts, groups(out.texts, k), groups(scores, k)))
            local += torch.tensor([sum(scores), len(scores), sum(map(len, out.response_ids)), sum(out.ended_with_eos)],
                                  dtype=torch.float64)
        total, n, tokens, ended = de.all_reduce_sum(local.to(de.device())).tolist()
        return {"label/score": total / max(n, 1.0), "label/eos_rate": ended / max(n, 1.0), "tokens": tokens}

    def evaluate(self, final: bool = False) -> Dict[str, Any]:
        if not final:
            return {}
        labelled = self.labelled
        if dist.is_initialized() and de.world_size() > 1:
            shares: List = [None] * de.world_size()
            dist.all_gather_object(shares, labelled)
            labelled = [x for share in shares for x in share]
        labelled.sort(key=lambda x: x[0])  # prompt order, whatever rank labelled a chunk
        prompts, texts, scores = ([y for x in labelled for y in x[part]] for part in (1, 2, 3))
        self.files, counts = label_rows(prompts, texts, scores)
        flat = [s for group in scores for s in group]
        return {**{f"label/{key}": value for key, value in counts.items()},
                "label/mean_score": sum(flat) / max(len(flat), 1),
                "label/chosen_score": _mean([r["chosen_score"] for r in self.files["pairs"]]),
                "label/rejected_score": _mean([r["rejected_score"] for r in self.files["pairs"]])}

    def save_checkpoint(self, step: int) -> None:
        """Nothing to save: labelling keeps no state worth resuming (a stopped run starts again)."""

    def export(self, out_dir: str) -> None:
        if de.rank() == 0:
            for name in OUTPUTS:
                write_jsonl(output_path(self.cfg.run_dir, name), self.files[name])
        de.barrier_if_distributed()
        if not self.files["pairs"]:  # samples.jsonl is written: it shows what the model wrote
            raise UserError(f"label: none of the {len(self.files['samples'])} prompts got two different scores "
                            f"from its {self.cfg.samples_per_prompt} samples, so there is no preference to write "
                            f"(see {output_path(self.cfg.run_dir, 'samples')}); raise samples_per_prompt or "
                            "sampling.temperature, or use a finer reward")


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def run(cfg: LabelConfig, reuse: bool = True, group: Optional[str] = None) -> Dict[str, Any]:
    inputs = model_inputs(cfg) or {}
    if cfg.reward_model:
        inputs["reward_model"] = cfg.reward_model
    return run_recipe("label", cfg, LabelWorker, cfg.data.train, inputs or None, group, reuse)


def main(argv=None) -> int:
    return stage_main(argv, LabelConfig, run, "Label sampled responses with rewards into preference data.")


if __name__ == "__main__":
    raise SystemExit(main())
