"""Tokenizers: the built-in one (trained locally, no download) and Hugging Face ones."""

from __future__ import annotations

import functools
from typing import Optional

from align.models.sources import resolve_source
from align.task import default_tokenizer_corpus as tokenizer_corpus

BUILTIN_TOKENIZER = "builtin:synthetic"
SPECIAL_TOKENS = {"pad_token": "<|pad|>", "bos_token": "<|bos|>", "eos_token": "<|eos|>"}
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
# Each turn is a role token, its text and a newline; generation starts after <|assistant|>.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
VOCAB_SIZE = 512


@functools.lru_cache(maxsize=1)
def _builtin_tokenizer_json() -> str:
    # heavy (tokenizers, transformers): only when a tokenizer is built, here and below
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[*SPECIAL_TOKENS.values(), *ROLE_TOKENS],
        # Every byte is in the vocabulary, so any text (user data too) can be encoded.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    return tok.to_str()


def build_builtin_tokenizer():
    """A byte-level BPE tokenizer trained on the default task, with pad/bos/eos and a chat template.

    Deterministic: the corpus is fixed and BPE training breaks ties by order, so two processes
    build the same vocabulary (tests/models check this).
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_builtin_tokenizer_json()),
        additional_special_tokens=ROLE_TOKENS,
        **SPECIAL_TOKENS,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.padding_side = "right"
    return tokenizer


def load_tokenizer(name_or_path: str, revision: Optional[str] = None, trust_remote_code: bool = False):
    """Loads a tokenizer by hub name, directory or GGUF source, or builds the built-in one.

    A tokenizer without a pad token gets its EOS token as pad, the usual choice for causal LMs.
    """
    if name_or_path in (BUILTIN_TOKENIZER,) or name_or_path.startswith("builtin:tiny"):
        return build_builtin_tokenizer()
    from transformers import AutoTokenizer

    name_or_path = resolve_source(name_or_path, key="model.tokenizer")  # a GGUF file: its materialised copy
    tokenizer = AutoTokenizer.from_pretrained(
        name_or_path, revision=revision, trust_remote_code=trust_remote_code
    )
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"{name_or_path}: tokenizer has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


_TURN_MARK = "\u2063RESPONSE\u2063"


def end_of_turn_id(tokenizer) -> int:
    """The token that ends an assistant turn under the tokenizer's chat template: the special
    token the template writes right after the assistant's text (`<|im_end|>` for ChatML,
    `<|eot_id|>` for Llama 3), else EOS. A response's loss mask ends with it, and generation
    stops at it."""
    template = getattr(tokenizer, "chat_template", None)
    if template:
        try:
            text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"},
                                                  {"role": "assistant", "content": _TURN_MARK}], tokenize=False)
        except Exception:  # a template that rejects this conversation: keep EOS
            text = ""
        if _TURN_MARK in text:
            after = tokenizer(text.split(_TURN_MARK, 1)[1], add_special_tokens=False)["input_ids"]
            special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
            if after and after[0] in special:
                return after[0]
    return tokenizer.eos_token_id


def stop_token_ids(tokenizer) -> list:
    """Token ids that end a sampled response: the chat template's end-of-turn token and EOS."""
    ids = [end_of_turn_id(tokenizer), tokenizer.eos_token_id]
    return [i for n, i in enumerate(ids) if i is not None and i not in ids[:n]]
