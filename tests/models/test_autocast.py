"""bf16 by autocast (align.models.autocast): fp32 weights, bf16 matmuls in the body, fp32 heads."""

import copy

import pytest
import torch
import torch.nn.functional as F

from align.config import DeepSpeedConfig, ModelConfig, OptimConfig
from align.engine.deepspeed_engine import build_ds_config
from align.models.autocast import (FullPrecisionLinear, LowPrecisionLinear, apply_autocast, autocast_dtype,
                                   cached_casts)
from align.models.builders import build_causal_lm
from align.models.logprobs import sequence_logprobs


def test_a_low_precision_linear_is_a_bf16_matmul_on_fp32_weights():
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 8)
    reference = copy.deepcopy(layer)
    apply_autocast(torch.nn.Sequential(layer))
    x = torch.randn(4, 16, requires_grad=True)
    out = layer(x)
    expected = F.linear(x.detach().bfloat16(), reference.weight.bfloat16(), reference.bias.bfloat16())
    assert isinstance(layer, LowPrecisionLinear) and layer.weight.dtype == torch.float32
    assert out.dtype == torch.float32  # cast back: no varlen attention to take mixed dtypes
    assert torch.equal(out, expected.float())
    out.sum().backward()
    # dL/dW = 1^T x in bf16, accumulated into the fp32 weight's gradient
    ones = torch.ones(4, 8, dtype=torch.bfloat16)
    assert layer.weight.grad.dtype == torch.float32
    assert torch.equal(layer.weight.grad, (ones.T @ x.detach().bfloat16()).float())


def test_the_tiny_model_keeps_its_head_fp32_and_follows_fp32_to_bf16_precision(builtin_tokenizer):
    fp32 = build_causal_lm(ModelConfig(), builtin_tokenizer, seed=0).eval()
    mixed = copy.deepcopy(fp32)
    low = apply_autocast(mixed)
    layers = fp32.config.num_hidden_layers
    assert low == 7 * layers  # q, k, v, o, gate, up, down in every layer
    assert isinstance(mixed.get_output_embeddings(), FullPrecisionLinear) and autocast_dtype(mixed) == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in mixed.parameters())
    assert mixed.state_dict().keys() == fp32.state_dict().keys()
    torch.manual_seed(1)
    ids = torch.randint(3, 500, (3, 24))
    mask = torch.ones_like(ids)
    mask[1, 18:] = 0
    loss_mask = mask.clone()
    loss_mask[:, :8] = 0
    with torch.no_grad():
        a = sequence_logprobs(fp32, ids, mask, loss_mask, padding_free=True).token_logps
        b = sequence_logprobs(mixed, ids, mask, loss_mask, padding_free=True).token_logps
        # The head alone: fp32 in, fp32 logits, even inside the generation's autocast region.
        hidden = torch.randn(5, fp32.config.hidden_size)
        with cached_casts(mixed):
            logits = mixed.get_output_embeddings()(hidden)
    assert logits.dtype == torch.float32 and torch.equal(logits, fp32.get_output_embeddings()(hidden))
    scored = (a != 0) | (b != 0)  # token_logps are (B, T), 0 off the loss mask
    diff = (a - b)[scored].abs()
    # bf16 keeps 8 bits of mantissa: per-token log-probs move by ~1e-2, never by much more.
    assert 0 < diff.max() < 0.1 and diff.mean() < 0.02


@pytest.mark.parametrize("mode,on_gpu,expected", [("auto", False, True), ("auto", True, False),
                                                  ("autocast", True, True), ("weights", False, False)])
def test_mixed_precision_decides_who_casts(mode, on_gpu, expected):
    ds = DeepSpeedConfig(precision="bf16", mixed_precision=mode)
    assert ds.uses_autocast(on_gpu) is expected
    assert DeepSpeedConfig(precision="fp32", mixed_precision=mode).uses_autocast(on_gpu) is False
    # On this CPU machine DeepSpeed casts the model to bf16 only for `weights`.
    assert build_ds_config(ds, OptimConfig(), 1)["bf16"]["enabled"] is (not ds.uses_autocast(False))
