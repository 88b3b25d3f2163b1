"""Padding-free forwards: a micro-batch's sequences concatenated into ONE row with no pad tokens.

Right-padded training batches waste compute on pad positions (about a third of the positions
of the built-in task's pairwise batches). Here the real tokens of all rows become a (1, N) row,
position ids restart at 0 for each sequence, and attention never crosses a sequence boundary,
so every linear layer (most of the FLOPs) runs on real tokens only and the results equal the
padded forward up to float summation order.

Boundaries reach the attention as the flash-attention varlen kwargs (`cu_seq_lens_q/k`,
`max_length_q/k`), which Hugging Face passes through to the attention function:
- `flash_attention_2/3` (GPU) use them natively;
- the attention registered here as "align_varlen" (what `sdpa` models are switched to when
  `model.padding_free` is on) scatters q, k, v into (S, H, L_max, D) and runs ONE causal
  `scaled_dot_product_attention`: only the attention itself sees padding, not the projections
  and MLPs around it;
- any other implementation still gets the right answer: with `attention_mask=None`,
  transformers builds a block-diagonal mask from the restarting position ids.

Imports only torch at module level; transformers when the attention is registered.
"""

from __future__ import annotations

from typing import Any, Dict, NamedTuple, Optional

import torch

ATTENTION = "align_varlen"
# Implementations that read the varlen kwargs (or, for ours, the sdpa fallback) correctly.
_SWITCHABLE = ("sdpa", ATTENTION)


class Packed(NamedTuple):
    """A padded (B, T) batch as one row of N real tokens."""

    input_ids: torch.Tensor  # (1, N)
    position_ids: torch.Tensor  # (1, N), restarting at 0 for every sequence
    keep: torch.Tensor  # (B, T) bool: the real tokens, in the order they were packed
    flat_index: torch.Tensor  # (N,) index of each packed token in the flattened (B*T,) batch
    cu_seqlens: torch.Tensor  # (S+1,) int32 sequence starts in the row, then N
    max_length: int  # longest sequence

    def attention_kwargs(self) -> Dict[str, Any]:
        """The flash-attention varlen kwargs that carry the boundaries to the attention."""
        return {"cu_seq_lens_q": self.cu_seqlens, "cu_seq_lens_k": self.cu_seqlens,
                "max_length_q": self.max_length, "max_length_k": self.max_length}

    def unpack(self, packed: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """(N, ...) per-token values -> (B, T, ...) with `fill` at pad positions (differentiable)."""
        B, T = self.keep.shape
        out = packed.new_full((B * T, *packed.shape[1:]), fill)
        return out.index_copy(0, self.flat_index, packed).view(B, T, *packed.shape[1:])


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor,
         position_ids: Optional[torch.Tensor] = None) -> Packed:
    """Packs the real tokens (attention_mask = 1) of each row, row by row.

    Shapes: input_ids, attention_mask, position_ids (B, T). Without `position_ids` each row is
    one sequence (right- or left-padded). With them, a row may hold several sequences
    (SFT packing): a sequence starts wherever the position id is 0.
    """
    keep = attention_mask.bool()
    if position_ids is None:
        position_ids = keep.long().cumsum(1) - 1
    positions = position_ids[keep]
    starts = torch.nonzero(positions == 0).flatten()
    n = positions.numel()
    if n == 0 or starts.numel() == 0 or int(starts[0]) != 0:
        raise ValueError("padding-free packing: every sequence must start at position id 0")
    cu = torch.cat([starts, starts.new_tensor([n])]).to(torch.int32)
    return Packed(input_ids[keep].unsqueeze(0), positions.unsqueeze(0), keep,
                  torch.nonzero(keep.flatten()).flatten(), cu, int((cu[1:] - cu[:-1]).max()))


class PackedPairs(NamedTuple):
    """A pairwise batch packed with its shared prompts forwarded once: pair i is ONE sequence
    [prompt, chosen, rejected], rejected continuing from the prompt's positions."""

    packed: Packed  # the (1, N) row; flat_index points into the flattened (2B * T,) batch
    loss_mask: torch.Tensor  # (N,) the batch's loss mask at each packed token
    predictor: torch.Tensor  # (N,) packed index of the logits that predict each token
    segment_mask: torch.Tensor  # (S, L_max, L_max) bool: key k visible to query q within pair s

    def attention_kwargs(self) -> Dict[str, Any]:
        return dict(self.packed.attention_kwargs(), segment_mask=self.segment_mask)


def pack_pairs(input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor,
               prompt_lengths: torch.Tensor) -> PackedPairs:
    """Packs a pairwise batch (rows 0..B-1 prompt+chosen, B..2B-1 the same prompts+rejected,
    right-padded; shapes (2B, T), prompt_lengths (B,)) so each prompt is forwarded once.

    Prefix sharing, as in Wang et al. 2024, "Accelerating Direct Preference Optimization with
    Prefix Sharing" (arXiv 2410.20305): the rejected tokens take the positions they have in
    their own sequence and attend to the prompt and to themselves, never to the chosen tokens,
    and the first rejected token is predicted from the prompt's last position. Every
    log-prob therefore equals the one of the separate sequences.
    """
    rows, T = input_ids.shape
    B = rows // 2
    pos = torch.arange(T, device=input_ids.device)
    plen = prompt_lengths.to(input_ids.device)[:, None]
    keep = torch.cat([attention_mask[:B].bool(), attention_mask[B:].bool() & (pos >= plen)], dim=1)  # (B, 2T)
    flat = torch.cat([torch.arange(B, device=pos.device)[:, None] * T + pos,
                      (torch.arange(B, device=pos.device)[:, None] + B) * T + pos], dim=1)
    both = lambda x: torch.cat([x[:B], x[B:]], dim=1)[keep]  # noqa: E731  (B, 2T) -> (N,) in pair order
    ids, positions, mask = both(input_ids), pos.repeat(2)[None].expand(B, -1)[keep], both(loss_mask)
    lengths = keep.sum(1)
    cu = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int32)
    starts, chosen_end = cu[:-1].long(), cu[:-1].long() + attention_mask[:B].sum(1)
    n = ids.numel()
    predictor = torch.arange(n, device=ids.device) - 1
    predictor[starts] = starts  # a sequence start is never scored
    predictor[chosen_end] = starts + plen[:, 0] - 1  # the first rejected token follows the prompt
    L = int(lengths.max())
    q, k = torch.arange(L, device=ids.device)[:, None], torch.arange(L, device=ids.device)[None, :]
    c_end = (chosen_end - starts)[:, None, None]
    # causal, and a rejected query (at or after the chosen end) skips the chosen keys
    segment_mask = (k <= q) & ~((q >= c_end) & (k >= plen[:, :, None]) & (k < c_end))
    packed = Packed(ids[None], positions[None], keep, flat[keep], cu, L)
    return PackedPairs(packed, mask, predictor, segment_mask)


def _padded_positions(cu_seqlens: torch.Tensor, max_length: int) -> torch.Tensor:
    """(N,) slot of each packed token in an (S * max_length) grid, sequence s in row s."""
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    owner = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu.device), lengths)
    offset = torch.arange(int(cu[-1]), device=cu.device) - cu[:-1][owner]
    return owner * max_length + offset


def varlen_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                     cu_seq_lens_q: Optional[torch.Tensor] = None, max_length_q: Optional[int] = None,
                     segment_mask: Optional[torch.Tensor] = None, **kwargs: Any):
    """Causal attention within each packed sequence; plain sdpa when the call is not packed.
    `segment_mask` (S, L_max, L_max), when given, replaces the causal mask (shared prompts).

    Shapes: query (1, H, N, D), key and value (1, H_kv, N, D). Returns ((1, N, H, D), None),
    the convention of transformers' attention functions.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if key.dtype != query.dtype or value.dtype != query.dtype:
        # bf16 by autocast (align.models.autocast): v comes from a bf16 matmul, q and k are fp32
        # after the rotary embedding; attention runs in fp32 (on CPU its backward is faster).
        key, value = key.to(query.dtype), value.to(query.dtype)
    if cu_seq_lens_q is None:  # generation, evaluation, padded batches
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if kwargs.get("sliding_window") or kwargs.get("softcap"):
        raise ValueError(f"{ATTENTION}: sliding-window and soft-capped attention are not supported; "
                         "set model.padding_free=false or model.attn_implementation=flash_attention_2")
    _, heads, n, dim = query.shape
    seqs = cu_seq_lens_q.numel() - 1
    slots = _padded_positions(cu_seq_lens_q, max_length_q)

    def to_grid(x: torch.Tensor) -> torch.Tensor:  # (1, h, N, D) -> (S, h, L, D), zeros after each sequence
        h = x.shape[1]
        grid = x.new_zeros(seqs * max_length_q, h, dim).index_copy(0, slots, x[0].transpose(0, 1))
        return grid.view(seqs, max_length_q, h, dim).transpose(1, 2)

    q, k, v = to_grid(query), to_grid(key), to_grid(value)
    if k.shape[1] != heads:  # grouped-query attention
        k, v = (x.repeat_interleave(heads // x.shape[1], dim=1) for x in (k, v))
    # Sequences are left-aligned in the grid, so the causal mask alone keeps every real query
    # off the zero slots after its sequence; the rows of those slots are dropped below.
    if segment_mask is None:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True,
                                                               scale=scaling)
    else:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=segment_mask[:, None],
                                                               dropout_p=dropout, scale=scaling)
    out = out.transpose(1, 2).reshape(seqs * max_length_q, heads, dim).index_select(0, slots)
    return out.unsqueeze(0), None


def can_share_prompts(model, attention_mask: torch.Tensor, prompt_lengths: torch.Tensor,
                      padding_free: bool) -> bool:
    """Whether `pack_pairs` applies: padding-free forwards, a model (or the engine around it)
    running the varlen attention (the only one that takes the shared-prompt mask), and a
    non-empty rejected response in every pair."""
    config = getattr(getattr(model, "module", model), "config", None)  # a DeepSpeed engine's `config` is its own
    if not padding_free or getattr(config, "_attn_implementation", None) != ATTENTION:
        return False
    B = prompt_lengths.shape[0]
    return bool((attention_mask[B:].sum(1) > prompt_lengths.to(attention_mask.device)).all())


def register() -> None:
    """Makes "align_varlen" a transformers attention implementation (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION, varlen_attention)
        # Unpacked calls fall back to sdpa, so they need sdpa's masks.
        ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)


def enable(model: torch.nn.Module) -> bool:
    """Switches an sdpa model to the varlen attention; True when padding-free forwards are fast
    on it. Models with sliding windows or soft-capping keep their attention (packing stays
    correct through transformers' block-diagonal mask, only slower)."""
    config = model.config
    if config._attn_implementation not in _SWITCHABLE:
        return config._attn_implementation.startswith("flash_attention")
    if getattr(config, "sliding_window", None) or getattr(config, "attn_logit_softcapping", None):
        return False
    register()
    model.set_attn_implementation(ATTENTION)
    return True
