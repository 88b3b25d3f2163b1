"""Normalised rows -> token ids, with one truncation policy for every kind.

Prompts: the tokenizer's chat template over `messages` (with the generation prompt) when it has
one and `data.use_chat_template`, encoded without adding special tokens (the template has
them); else `prompt_text` encoded with the tokenizer's own special tokens (e.g. a BOS).
Responses: encode(response) + [end], where end is the chat template's end-of-turn token (the one
it writes after an assistant's text, e.g. <|im_end|>) when prompts are chat-templated, else EOS:
the loss/response mask covers exactly the assistant's tokens and its end of turn.

Truncation: a prompt longer than `data.max_length` tokens is an error (or dropped); one longer
than `data.max_prompt_length` keeps its end (the turn nearest the response). Responses are cut to
fit `data.max_length` and then have no EOS, which `*_truncated` columns record. Both sides of a
pair share one prompt and stay in one example whatever is cut.

Works with any Hugging Face fast tokenizer; importing this module imports no transformers.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import datasets
from datasets import Features, List as ListOf, Value

from align.config import DataConfig
from align.data.errors import DataError, DataReport, RowProblem, drop_marked, logger
from align.data.formats import KINDS, MESSAGES
from align.models.tokenizer import end_of_turn_id

IDS = ListOf(Value("int32"))
_WHERE = {"source": Value("string"), "row": Value("int64")}
TOKENIZED = {
    "sft": Features({"input_ids": IDS, "loss_mask": ListOf(Value("int8")),
                     "prompt_truncated": Value("bool"), "response_truncated": Value("bool"), **_WHERE}),
    "pairwise": Features({
        "prompt_ids": IDS, "chosen_ids": IDS, "rejected_ids": IDS, "margin": Value("float32"),
        "weight": Value("float32"), "group": Value("int64"), "prompt_truncated": Value("bool"),
        "chosen_truncated": Value("bool"), "rejected_truncated": Value("bool"), **_WHERE}),
    "binary": Features({"prompt_ids": IDS, "completion_ids": IDS, "label": Value("bool"),
                        "prompt_truncated": Value("bool"), "completion_truncated": Value("bool"), **_WHERE}),
    "prompt": Features({"prompt_ids": IDS, "messages": MESSAGES, "prompt_text": Value("string"),
                        "extras": Value("string"), "prompt_truncated": Value("bool"), **_WHERE}),
    "ranking": Features({"prompt_ids": IDS, "responses_ids": ListOf(IDS), "group": Value("int64"),
                         "prompt_truncated": Value("bool"), "responses_truncated": ListOf(Value("bool")),
                         **_WHERE}),
}
# The response columns of each normalised kind (ranking rows hold a list, `responses`).
_RESPONSES = {
    "sft": ["completion"], "pairwise": ["chosen", "rejected"], "binary": ["completion"], "prompt": [],
}
_KEPT = ("source", "row", "group", "margin", "weight", "label", "messages", "prompt_text", "extras")


def uses_chat_template(tokenizer, data_cfg: DataConfig) -> bool:
    return bool(data_cfg.use_chat_template and getattr(tokenizer, "chat_template", None))


def encode_prompts(tokenizer, messages: Sequence[list], prompt_texts: Sequence[str],
                   chat: bool) -> List[List[int]]:
    if chat:
        texts = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    return tokenizer(list(prompt_texts), add_special_tokens=True)["input_ids"]


def encode_responses(tokenizer, texts: Sequence[str], end_id: Optional[int] = None) -> List[List[int]]:
    """encode(text) + [end_id] (EOS by default) for each response text."""
    end = tokenizer.eos_token_id if end_id is None else end_id
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [ids + [end] for ids in encoded]


def fit(prompt: List[int], responses: List[List[int]], data_cfg: DataConfig):
    """Applies the truncation policy: (prompt, responses, prompt cut?, [response cut?])."""
    if len(prompt) > data_cfg.max_length:
        problem = f"{len(prompt)} tokens, longer than data.max_length={data_cfg.max_length}"
        raise RowProblem("prompt", problem, "prompt_too_long")
    cut_prompt = len(prompt) > data_cfg.max_prompt_length
    if cut_prompt:
        prompt = prompt[len(prompt) - data_cfg.max_prompt_length:]
    room = data_cfg.max_length - len(prompt)
    return prompt, [r[:room] for r in responses], cut_prompt, [len(r) > room for r in responses]


def _tokenize_batch(batch: Dict[str, list], kind: str, tokenizer, data_cfg: DataConfig,
                    drop: bool) -> Dict[str, list]:
    chat = uses_chat_template(tokenizer, data_cfg)
    prompts = encode_prompts(tokenizer, batch["messages"], batch["prompt_text"], chat)
    end = end_of_turn_id(tokenizer) if chat else tokenizer.eos_token_id
    if kind == "ranking":
        responses = [encode_responses(tokenizer, rs, end) for rs in batch["responses"]]
    else:
        columns = [encode_responses(tokenizer, batch[name], end) for name in _RESPONSES[kind]]
        responses = [list(rs) for rs in zip(*columns)] if columns else [[] for _ in prompts]
    out: Dict[str, list] = {c: [] for c in [*TOKENIZED[kind], "_drop"]}
    for i, (prompt, resp) in enumerate(zip(prompts, responses)):
        try:
            prompt, resp, cut_prompt, cut = fit(prompt, resp, data_cfg)
            out["_drop"].append("")
        except RowProblem as p:
            if not drop:
                raise DataError(batch["source"][i], p.problem, batch["row"][i], p.field, p.reason) from None
            cut_prompt, cut = False, [False] * len(resp)  # the row is filtered out right after
            out["_drop"].append(p.reason)
        out["prompt_truncated"].append(cut_prompt)
        for c in _KEPT:
            if c in out:
                out[c].append(batch[c][i])
        if kind == "sft":
            out["input_ids"].append(prompt + resp[0])
            out["loss_mask"].append([0] * len(prompt) + [1] * len(resp[0]))
            out["response_truncated"].append(cut[0])
            continue
        out["prompt_ids"].append(prompt)
        if kind == "ranking":
            out["responses_ids"].append(resp)
            out["responses_truncated"].append(cut)
        for name, ids, was_cut in zip(_RESPONSES.get(kind, []), resp, cut):
            out[f"{name}_ids"].append(ids)
            out[f"{name}_truncated"].append(was_cut)
    return out


def tokenize_rows(
    ds: datasets.Dataset, kind: str, tokenizer, data_cfg: DataConfig, report: Optional[DataReport] = None
) -> datasets.Dataset:
    """Token ids of normalised rows from `load_rows`; columns per kind in TOKENIZED.

    sft: input_ids and loss_mask (1 on response tokens and EOS). pairwise: prompt_ids,
    chosen_ids, rejected_ids, margin, weight, group. binary: prompt_ids, completion_ids, label.
    prompt: prompt_ids with messages and prompt_text kept. ranking: prompt_ids and responses_ids
    (best first). Every kind keeps source/row and *_truncated flags.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown data kind {kind!r}; choose from {list(KINDS)}")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; responses need one to end")
    drop = data_cfg.on_error == "drop"
    out = ds.map(
        _tokenize_batch,
        batched=True,
        fn_kwargs={"kind": kind, "tokenizer": tokenizer, "data_cfg": data_cfg, "drop": drop},
        remove_columns=ds.column_names,
        features=Features({**TOKENIZED[kind], "_drop": Value("string")}),
        desc=f"Tokenizing {kind} rows",
    )
    out = drop_marked(out, f"{kind} rows", report) if drop else out.remove_columns("_drop")
    if len(out) == 0:
        raise DataError(f"{kind} rows", f"all {len(ds)} rows were dropped at tokenization")
    flags = {c: out[c][:] for c in out.column_names if c.endswith("_truncated")}  # [:] reads at once
    cut = [f for c, column in flags.items() if c != "prompt_truncated" for f in column]
    counts = {"truncated/prompt": sum(flags["prompt_truncated"]),
              "truncated/response": sum(sum(f) if isinstance(f, list) else f for f in cut)}  # ranking: lists
    if report is not None:
        for key, n in counts.items():
            report.add(key, n)
    logger.info("tokenized %d %s rows: %d prompts left-truncated, %d responses cut (no EOS)",
                len(out), kind, counts["truncated/prompt"], counts["truncated/response"])
    return out


def pack_sft(ds: datasets.Dataset, max_length: int) -> datasets.Dataset:
    """Padding-free packing of tokenized SFT rows into rows of at most `max_length` tokens.

    Whole examples are concatenated in order (none is split, so no response token is lost) and
    `position_ids` restart at 0 at each example, from which transformers builds a block-diagonal
    attention mask. Each example starts with a prompt token (loss_mask 0), so no token is
    trained to follow the previous example.
    """

    def pack(batch: Dict[str, list]) -> Dict[str, list]:
        out: Dict[str, list] = {"input_ids": [], "loss_mask": [], "position_ids": []}
        ids_row: List[int] = []
        mask_row: List[int] = []
        pos_row: List[int] = []
        for ids, mask in zip(batch["input_ids"], batch["loss_mask"]):
            if ids_row and len(ids_row) + len(ids) > max_length:
                out["input_ids"].append(ids_row)
                out["loss_mask"].append(mask_row)
                out["position_ids"].append(pos_row)
                ids_row, mask_row, pos_row = [], [], []
            ids_row, mask_row, pos_row = ids_row + ids, mask_row + mask, pos_row + list(range(len(ids)))
        if ids_row:
            out["input_ids"].append(ids_row)
            out["loss_mask"].append(mask_row)
            out["position_ids"].append(pos_row)
        return out

    features = Features({"input_ids": IDS, "loss_mask": ListOf(Value("int8")), "position_ids": IDS})
    return ds.map(pack, batched=True, batch_size=1000, remove_columns=ds.column_names,
                  features=features, desc="Packing SFT rows")
