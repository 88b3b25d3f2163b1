"""Model builders shared by every stage: causal LMs (policy, reference) and scalar-scoring
models (reward model, PPO value model), from a hub name, a local directory or the built-in
tiny family; and saving in Hugging Face format (safetensors) so any stage's output loads with
`from_pretrained`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import tempfile
from typing import Any, Callable, Dict, Optional

import torch

from align.config import ModelConfig
from align.models.lora import apply_lora
from align.models.sources import BUILTIN_GGUF, resolve_model_and_tokenizer, resolve_source
from align.models.tokenizer import VOCAB_SIZE, build_builtin_tokenizer, load_tokenizer

# The built-in tiny Llama family, randomly initialised (parameter counts with the built-in
# 512-token vocabulary and tied embeddings).
TINY_MODELS: Dict[str, Dict[str, int]] = {
    # about 0.9M parameters
    "builtin:tiny-1m": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=352),
    # about 6.6M parameters
    "builtin:tiny-8m": dict(hidden_size=256, num_hidden_layers=8, num_attention_heads=8, intermediate_size=704),
    # about 25M parameters
    "builtin:tiny-30m": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=1408),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# glibc serves a block from mmap (returned to the OS on free) only above a threshold that grows
# to the largest block freed so far, up to 32 MiB; below it, freed activations stay in the heap.
# A step of SmolLM2 (8 x 512 tokens) then held 2.2 GiB of freed memory (benchmarks/real_model_memory.py).
# Fixed at 8 MiB: big activations go back to the OS; smaller blocks are reused from the heap,
# because re-faulting them costs more than they hold. At glibc's initial 128 KiB, a GRPO minibatch
# update of tiny-30m (16 rows, its largest activation 4.5 MB) took 0.85 s against 0.53 s, while a
# SmolLM2 8 x 512 step peaked 758 instead of 925 MiB above the model at the same step time.
MMAP_THRESHOLD = 8 * 1024 * 1024
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)


def return_freed_host_memory() -> bool:
    """Fixes glibc's mmap threshold at MMAP_THRESHOLD for this process, so host tensors above it
    go back to the OS when freed: peak RSS follows the live big tensors, at the cost of page
    faults when that memory is used again. False where there is no glibc `mallopt` (macOS, musl).
    Idempotent; the model builders call it unless `model.return_freed_memory` is off."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False


def is_builtin(name_or_path: str) -> bool:
    """A built-in tiny model (built in memory); `builtin:smollm2-*` is a real model file instead."""
    return name_or_path.startswith("builtin:") and name_or_path not in BUILTIN_GGUF


def tiny_llama_config(name: str, tokenizer=None, **overrides: Any):
    from transformers import LlamaConfig

    if name not in TINY_MODELS:
        raise ValueError(f"model.name_or_path: unknown built-in model {name!r}; choose from {sorted(TINY_MODELS)}")
    tokenizer = tokenizer or build_builtin_tokenizer()
    sizes = TINY_MODELS[name]
    return LlamaConfig(
        vocab_size=max(VOCAB_SIZE, len(tokenizer)),
        max_position_embeddings=1024,
        num_key_value_heads=sizes["num_attention_heads"],
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **sizes,
        **overrides,
    )


def build_tokenizer(cfg: ModelConfig):
    """The tokenizer of `cfg`: the model's own source's unless `model.tokenizer` names another."""
    _, source = resolve_model_and_tokenizer(cfg.name_or_path, cfg.tokenizer, cfg.gguf_file)
    return load_tokenizer(source, cfg.revision, cfg.trust_remote_code)


def _finish(model, cfg: ModelConfig, tokenizer):
    if cfg.return_freed_memory:
        return_freed_host_memory()
    if tokenizer is not None and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.padding_free:
        from align.models.padding_free import enable

        enable(model)
    if cfg.gradient_checkpointing:
        # Non-reentrant: works with frozen inputs (embeddings) and under ZeRO-3's hooks.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def _load_kwargs(cfg: ModelConfig) -> Dict[str, Any]:
    return dict(
        revision=cfg.revision,
        trust_remote_code=cfg.trust_remote_code,
        dtype=DTYPES[cfg.dtype],
        attn_implementation=cfg.attn_implementation,
    )


def build_causal_lm(cfg: ModelConfig, tokenizer=None, seed: int = 0):
    """A causal LM from `cfg`; the built-in family is initialised from `seed`."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    if is_builtin(cfg.name_or_path):
        config = tiny_llama_config(cfg.name_or_path, tokenizer, attn_implementation=cfg.attn_implementation)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config).to(DTYPES[cfg.dtype])
    else:
        model = AutoModelForCausalLM.from_pretrained(resolve_source(cfg.name_or_path, cfg.gguf_file),
                                                     **_load_kwargs(cfg))
    return apply_lora(_finish(model, cfg, tokenizer), cfg.lora, seed=seed)


def build_scalar_model(cfg: ModelConfig, tokenizer=None, seed: int = 0):
    """A model that maps every token to one scalar (reward model, PPO value model).

    From a causal-LM checkpoint (e.g. the SFT stage's output) the backbone is reused and a
    new one-output head is initialised from `seed`.
    """
    from transformers import AutoModelForSequenceClassification, LlamaForSequenceClassification

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if is_builtin(cfg.name_or_path):
            config = tiny_llama_config(cfg.name_or_path, tokenizer, num_labels=1,
                                       attn_implementation=cfg.attn_implementation)
            model = LlamaForSequenceClassification(config).to(DTYPES[cfg.dtype])
        else:
            model = AutoModelForSequenceClassification.from_pretrained(
                resolve_source(cfg.name_or_path, cfg.gguf_file), num_labels=1, **_load_kwargs(cfg)
            )
    # LoRA on the backbone; the new score head trains in full.
    return apply_lora(_finish(model, cfg, tokenizer), cfg.lora, scalar=True, seed=seed)


def scalar_head(model) -> torch.nn.Module:
    """The final projection to one scalar of a sequence-classification model."""
    for name in ("score", "classifier", "v_head"):
        head = getattr(model, name, None)
        if isinstance(head, torch.nn.Module):
            return head
    raise TypeError(f"{type(model).__name__}: no scalar head found (expected .score or .classifier)")


def _packed_hidden(model, input_ids, attention_mask, position_ids=None):
    """(Packed, (N, H) last hidden states) of the backbone on the batch packed into one row."""
    from align.models.padding_free import pack

    packed = pack(input_ids, attention_mask, position_ids)
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(input_ids=packed.input_ids, position_ids=packed.position_ids,
                      **packed.attention_kwargs()).last_hidden_state
    return packed, hidden[0]


def token_scalars(model, input_ids, attention_mask, position_ids=None, padding_free: bool = False) -> torch.Tensor:
    """Per-token scalar outputs (B, T) of a scalar model: the value head at every position
    (0 at pad positions when `padding_free`, which forwards the real tokens as one packed row)."""
    if padding_free:
        packed, hidden = _packed_hidden(model, input_ids, attention_mask, position_ids)
        return packed.unpack(scalar_head(model)(hidden).squeeze(-1).float())
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
    return scalar_head(model)(hidden).squeeze(-1).float()


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of the last non-padding token, for left- or right-padded rows."""
    T = attention_mask.shape[1]
    return (T - 1) - attention_mask.flip(dims=[1]).long().argmax(dim=1)


def sequence_scores(model, input_ids, attention_mask, padding_free: bool = False) -> torch.Tensor:
    """(B,) scalar score of each sequence, read at its last non-padding token.

    Uses the attention mask, not `pad_token_id`, so a tokenizer whose pad token equals its EOS
    token (common for hub models) still scores at the EOS that ends the response.
    `padding_free`: one packed forward of the real tokens; the head runs on the B last tokens only.
    """
    if padding_free:
        packed, hidden = _packed_hidden(model, input_ids, attention_mask)
        return scalar_head(model)(hidden[packed.cu_seqlens[1:].long() - 1]).squeeze(-1).float()
    values = token_scalars(model, input_ids, attention_mask)
    return values.gather(1, last_token_index(attention_mask)[:, None]).squeeze(1)


def pair_scores(model, input_ids, attention_mask, loss_mask, prompt_lengths, padding_free: bool = True):
    """`sequence_scores` of a pairwise batch (rows 0..B-1 prompt+chosen, B..2B-1 the same
    prompts+rejected; (2B, T)), forwarding each prompt once when the model runs the varlen
    attention (align.models.padding_free.pack_pairs). (2B,) scores, chosen first."""
    from align.models.padding_free import can_share_prompts, pack_pairs

    if not can_share_prompts(model, attention_mask, prompt_lengths, padding_free):
        return sequence_scores(model, input_ids, attention_mask, padding_free=padding_free)
    pairs = pack_pairs(input_ids, attention_mask, loss_mask, prompt_lengths)
    packed = pairs.packed
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(input_ids=packed.input_ids, position_ids=packed.position_ids,
                      **pairs.attention_kwargs()).last_hidden_state[0]
    starts = packed.cu_seqlens[:-1].long()
    chosen_last = starts + attention_mask[: prompt_lengths.shape[0]].sum(1) - 1
    rejected_last = packed.cu_seqlens[1:].long() - 1
    return scalar_head(model)(hidden[torch.cat([chosen_last, rejected_last])]).squeeze(-1).float()


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def save_pretrained(model, tokenizer, out_dir: str, extra_config: Optional[Dict[str, Any]] = None,
                    state_dict: Optional[Dict[str, torch.Tensor]] = None) -> str:
    """Saves model (safetensors) and tokenizer in Hugging Face format, atomically.

    `extra_config` entries are stored in the model's config.json (e.g. reward normalisation).
    `state_dict` overrides the model's own tensors (e.g. weights gathered from ZeRO-3 shards).
    """
    for key, value in (extra_config or {}).items():
        setattr(model.config, key, value)
    return export_atomically(out_dir, lambda tmp: model.save_pretrained(tmp, state_dict=state_dict,
                                                                        safe_serialization=True), tokenizer)


def export_atomically(out_dir: str, write: Callable[[str], Any], tokenizer=None) -> str:
    """`write(tmp)` then the tokenizer into a temporary folder beside `out_dir`, renamed into
    place: a reader never sees a half-written export."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-export-")
    write(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.rename(tmp, out_dir)
    return out_dir
