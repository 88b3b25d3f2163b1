"""A decode step of our own for Llama-family causal LMs (Llama, Mistral, Qwen2, Qwen3, SmolLM2 and
the builtin tiny models), with one preallocated K/V buffer per layer.

Why not `generate`: on CPU, each decoding step of transformers' loop concatenates every layer's
K/V cache onto a new tensor, rebuilds a 4-D attention mask over the whole length and runs
the full-vocabulary logits processors; at SmolLM2-135M and batch 32 that is most of a step. Here
a step writes one position into the buffers in place, attends over a view of the filled prefix
(grouped-query attention without repeating K/V), and computes logits for the new position only.

The model's own modules do everything else (embedding, norms, rotary embedding, the q/k/v/o and MLP
linear layers, LM head), so LoRA layers, the bf16 autocast linear layers and any rope scaling
behave exactly as in training: a sampled token's log-prob equals the trainer's to float rounding.

    decoder = KVDecoder.for_model(model)   # None: an architecture this does not handle
    logits = decoder.start(input_ids, attention_mask, max_new_tokens)   # (B, V), last prompt position
    logits = decoder.step(next_tokens)                                  # (B, V), one new position
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


def _inner(model):
    """The *ForCausalLM module under a peft wrapper."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class KVDecoder:
    """Decodes left-padded prompts with a static K/V buffer per layer: (B, kv_heads, P + N, D)."""

    def __init__(self, causal_lm):
        self.lm = causal_lm
        self.body = causal_lm.model
        cfg = causal_lm.config
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.scaling = self.body.layers[0].self_attn.scaling
        self.dtype = self.body.embed_tokens.weight.dtype
        self.keys = self.values = None

    @classmethod
    def for_model(cls, model, max_length: Optional[int] = None) -> Optional["KVDecoder"]:
        """A decoder for `model` (peft-wrapped or not), or None when its architecture is not one
        this implements (the caller then uses `generate`)."""
        lm = _inner(model)
        cfg = getattr(lm, "config", None)
        if getattr(cfg, "model_type", None) not in SUPPORTED or not hasattr(lm, "model"):
            return None
        window = getattr(cfg, "sliding_window", None)
        if window and getattr(cfg, "use_sliding_window", True) and (max_length is None or max_length > window):
            return None  # sliding-window attention would need a different mask
        layer = lm.model.layers[0]
        if getattr(cfg, "layer_types", None) and any(t != "full_attention" for t in cfg.layer_types):
            return None
        if not all(hasattr(layer.self_attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling")):
            return None
        return cls(lm)

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Runs the prompts (B, P), left-padded, allocates the buffers for P + max_new_tokens
        positions, and returns the next-token logits (B, V). Identical rows (the K samples of one
        prompt in group-relative RL) are run once and their K/V copied."""
        batch, width = input_ids.shape
        device = input_ids.device
        rows = torch.cat([input_ids, attention_mask.to(input_ids.dtype)], 1)
        unique, inverse = torch.unique(rows, dim=0, return_inverse=True)
        if len(unique) < batch:
            prompt_ids, prompt_mask = unique[:, :width], unique[:, width:]
        else:
            prompt_ids, prompt_mask, inverse = input_ids, attention_mask, None
        # Positions count real tokens only, as generate and the trainer's forwards do.
        positions = (prompt_mask.long().cumsum(1) - 1).clamp_min(0)
        causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
        # A padding query attends to itself only, so no softmax row is empty.
        mask = (causal[None] & prompt_mask.bool()[:, None]) | torch.eye(width, dtype=torch.bool, device=device)
        layers = len(self.body.layers)
        shape = (layers, len(prompt_ids), self.kv_heads, width, self.head_dim)
        self.keys = torch.empty(shape, dtype=self.dtype, device=device)
        self.values = torch.empty(shape, dtype=self.dtype, device=device)
        logits = self._forward(prompt_ids, positions, 0, mask[:, None])
        prompt_keys, prompt_values = self.keys, self.values
        shape = (layers, batch, self.kv_heads, width + max_new_tokens, self.head_dim)
        self.keys = torch.zeros(shape, dtype=self.dtype, device=device)
        self.values = torch.zeros(shape, dtype=self.dtype, device=device)
        pick = slice(None) if inverse is None else inverse
        self.keys[:, :, :, :width] = prompt_keys[:, pick]
        self.values[:, :, :, :width] = prompt_values[:, pick]
        # Key validity over the whole buffer: prompt padding stays masked, new positions fill in.
        self.valid = torch.zeros(batch, width + max_new_tokens, dtype=torch.bool, device=device)
        self.valid[:, :width] = attention_mask.bool()
        self.length = width
        self.next_position = positions[pick, -1:] + 1
        return logits[pick]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Appends one token per row (B,) and returns the next-token logits (B, V)."""
        at = self.length
        self.valid[:, at] = True
        self.length += 1
        positions = self.next_position
        self.next_position = positions + 1
        return self._forward(tokens[:, None], positions, at, self.valid[:, None, None, : at + 1])

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, at: int, mask: torch.Tensor) -> torch.Tensor:
        """Writes positions at .. at + T - 1 of the buffers; mask (B, 1, T, at + T) says which keys
        each query sees. Returns the logits of the last position (B, V).

        Under an autocast region (align.models.autocast.cached_casts, which keeps each weight's
        bf16 copy for the whole generation) autocast is switched off here, so only the linear
        layers that autocast themselves in training run in bf16, as in the trainer's forward."""
        with torch.autocast(ids.device.type, enabled=False):
            return self._layers(ids, positions, at, mask)

    def _layers(self, ids: torch.Tensor, positions: torch.Tensor, at: int, mask: torch.Tensor) -> torch.Tensor:
        batch, width = ids.shape
        hidden = self.body.embed_tokens(ids)
        cos, sin = self.body.rotary_emb(hidden, positions)
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, D): broadcast over heads
        end = at + width
        for index, layer in enumerate(self.body.layers):
            attn = layer.self_attn
            normed = layer.input_layernorm(hidden)
            q = attn.q_proj(normed).view(batch, width, -1, self.head_dim).transpose(1, 2)
            k = attn.k_proj(normed).view(batch, width, -1, self.head_dim).transpose(1, 2)
            v = attn.v_proj(normed).view(batch, width, -1, self.head_dim).transpose(1, 2)
            if hasattr(attn, "q_norm"):  # Qwen3
                q, k = attn.q_norm(q), attn.k_norm(k)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            self.keys[index, :, :, at:end] = k
            self.values[index, :, :, at:end] = v
            keys, values = self.keys[index, :, :, :end], self.values[index, :, :, :end]
            out = self._attend(q.to(keys.dtype), keys, values, mask)
            hidden = hidden + attn.o_proj(out.transpose(1, 2).reshape(batch, width, -1).to(hidden.dtype))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        last = self.body.norm(hidden[:, -1:])
        return self.lm.lm_head(last)[:, 0]

    def _attend(self, q, keys, values, mask) -> torch.Tensor:
        """q (B, H, T, D); keys, values (B, H_kv, L, D); mask (B, 1, T, L). Returns (B, H, T, D)."""
        batch, heads, width, dim = q.shape
        if width > 1:
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scaling,
                                                  enable_gqa=self.kv_heads != heads)
        # One query per row: the heads sharing a K/V head are that head's rows, no repeated K/V.
        grouped = q.view(batch, self.kv_heads, heads // self.kv_heads, dim)
        scores = torch.matmul(grouped, keys.transpose(-1, -2)) * self.scaling  # (B, H_kv, G, L)
        scores = scores.masked_fill(~mask, float("-inf"))  # mask (B, 1, 1, L)
        weights = torch.softmax(scores.float(), dim=-1).to(values.dtype)
        return torch.matmul(weights, values).view(batch, heads, 1, dim)
