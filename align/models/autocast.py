"""bf16 by autocast: fp32 weights, bf16 matmuls in the linear layers, everything else in fp32.

`deepspeed.mixed_precision: autocast` (align.config.DeepSpeedConfig) trains this way, as HF
Trainer and TRL do with `bf16=True`: the weights, gradients, optimizer and exports stay fp32, and
only the linear layers of the body multiply in bf16 (fp32 accumulation, bf16 result). Kept in
fp32:

- the LM head and the scalar heads (score, classifier, v_head): a 49k-vocabulary logit rounded to
  bf16 is off by up to 0.06 at |logit| 16-32, which is noise in every log-prob, ratio and KL;
- norms, rotary embeddings, the residual stream and attention: RoPE's fp32 cos/sin promote q and k
  to fp32, and on CPU fp32 flash attention's backward is 3.6x faster than bf16's (SmolLM2, 512
  tokens; benchmarks/results/profile_dpo_smollm2_bf16.md).

Against DeepSpeed's own bf16 (the whole model cast to bf16, fp32 master copies in the optimizer):
no slow unfused optimizer step on CPU, and an update smaller than half a bf16 step still changes
the next forward and the export.

The layers are switched in place by class (`__class__`), so state dicts, peft, ZeRO-3's hooks and
deepcopy see ordinary nn.Linear modules.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch

# Linear modules kept in fp32 by the last component of their name (peft nests them deeper:
# base_model.model.score.modules_to_save.default).
FULL_PRECISION_NAMES = ("lm_head", "score", "classifier", "v_head")


class LowPrecisionLinear(torch.nn.Linear):
    """nn.Linear whose matmul runs under autocast at `autocast_dtype` (set per instance). Its
    output has the input's dtype, unless `low_output` (set per instance) keeps it low."""

    autocast_dtype = torch.bfloat16
    low_output = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=self.autocast_dtype):
            out = super().forward(x)
        return out if self.low_output else out.to(x.dtype)


def _low_output_class(cls: type) -> type:
    """`cls` (a norm) with its output cast to the module's `autocast_dtype`."""

    def forward(self, *args, **kwargs):
        return cls.forward(self, *args, **kwargs).to(self.autocast_dtype)

    return type(f"LowOutput{cls.__name__}", (cls,), {"forward": forward, "__module__": __name__})


_LOW_OUTPUT_CLASSES: dict = {}


class FullPrecisionLinear(torch.nn.Linear):
    """nn.Linear that stays fp32 inside an autocast region (a head inside `cached_casts`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.to(self.weight.dtype))


def _keep_full(name: str, module: torch.nn.Module, heads) -> bool:
    return module in heads or any(part in FULL_PRECISION_NAMES for part in name.split("."))


def _in_layer(name: str) -> bool:
    """Whether a module sits inside a numbered layer (model.layers.3.input_layernorm), not after
    the last one (model.norm, which feeds the fp32 head)."""
    return any(part.isdigit() for part in name.split("."))


def apply_autocast(model: torch.nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """Switches `model`'s linear layers in place: the body's to `LowPrecisionLinear` at `dtype`,
    the heads to `FullPrecisionLinear`. Returns how many run in `dtype`. The weights stay fp32.

    When the model runs the varlen attention (align.models.padding_free, which takes q, k, v of
    mixed dtypes), activations between the matmuls stay in `dtype` too: the norms inside the
    layers hand their (fp32-computed) output over in `dtype`, once for the 3 or 2 linear layers
    that read it, and the linear layers keep their output low. The residual stream, rotary
    embedding, attention and the final norm stay fp32. Otherwise every linear layer casts its
    output back, so any attention sees fp32."""
    from align.models.padding_free import ATTENTION

    config = getattr(model, "config", None)
    low_activations = getattr(config, "_attn_implementation", None) == ATTENTION
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    heads = [head] if isinstance(head, torch.nn.Module) else []
    low = 0
    for name, module in model.named_modules():
        kind = type(module)
        if kind is torch.nn.Linear:
            if _keep_full(name, module, heads):
                module.__class__ = FullPrecisionLinear
            else:
                module.__class__ = LowPrecisionLinear
                module.autocast_dtype, module.low_output = dtype, low_activations
                low += 1
        elif low_activations and kind.__name__.endswith(("RMSNorm", "LayerNorm")) and _in_layer(name):
            if kind not in _LOW_OUTPUT_CLASSES:
                _LOW_OUTPUT_CLASSES[kind] = _low_output_class(kind)
            module.__class__ = _LOW_OUTPUT_CLASSES[kind]
            module.autocast_dtype = dtype
    return low


def autocast_dtype(model: torch.nn.Module):
    """The dtype `apply_autocast` gave `model`'s linear layers, or None."""
    for module in model.modules():
        if isinstance(module, LowPrecisionLinear):
            return module.autocast_dtype
    return None


@contextmanager
def cached_casts(model: torch.nn.Module):
    """One autocast region around many forwards (generation): each weight is cast to bf16 once per
    region, not once per token, because autocast caches casts until its outermost region exits.
    Attention and the elementwise ops of the body then run in bf16 as well; the heads stay fp32."""
    dtype = autocast_dtype(model)
    if dtype is None:
        with nullcontext():
            yield
        return
    device = next(model.parameters()).device.type
    with torch.autocast(device, dtype=dtype, cache_enabled=True):
        yield
