"""Under ZeRO-3 every call of the partitioned LM head is a collective (its hooks all-gather the
weight), and `head_logprobs` calls it once per chunk of scored positions. Ranks with different
numbers of scored positions must still call it equally often: a 2-rank run hung for good in its
final eval when one rank's eval micro-batch held only padding rows (no scored position, so no head
call, while the other rank waited in the head's all-gather), and a real vocabulary (341 positions
a chunk at 49k) would hang training the same way whenever the ranks' chunk counts differ.

Both tests fail by timeout without the fix.
"""

import json
import sys

import pytest
import torch
from ray import cloudpickle

from align.config import DeepSpeedConfig, ModelConfig, OptimConfig, RayConfig, load_config
from align.engine.ray_group import ActorGroup

pytestmark = pytest.mark.slow


class HeadRole:
    """One rank of a tiny causal LM under ZeRO-3 with every parameter partitioned."""

    def __init__(self):
        from align.engine import deepspeed_engine as de
        from align.models.builders import build_causal_lm
        from align.models.tokenizer import build_builtin_tokenizer

        net = build_causal_lm(ModelConfig(name_or_path="builtin:tiny-1m"), build_builtin_tokenizer(), seed=0)
        ds = DeepSpeedConfig(zero_stage=3, micro_batch_size=4, param_persistence_threshold=0)
        self.engine = de.init_train_engine(net, ds, OptimConfig(), 1)

    def score(self, n: int, chunk_size: int):
        """head_logprobs of `n` random positions (forward and backward, chunk_size positions a
        chunk), and the same from the gathered weight in float64: (max |logp error|, max |grad
        error| of the hidden states, number of positions)."""
        import deepspeed

        from align.models.logprobs import head_logprobs

        head = self.engine.module.get_output_embeddings()
        torch.manual_seed(n)
        hidden = torch.randn(n, head.in_features, requires_grad=True)
        targets = torch.randint(0, head.out_features, (n,))
        logps, _ = head_logprobs(head, hidden, targets, chunk_size=chunk_size)
        self.engine.backward(logps.sum())
        with deepspeed.zero.GatheredParameters([head.weight]):
            weight = head.weight.detach().double().clone()
        ref_hidden = hidden.detach().double().requires_grad_()
        ref = torch.log_softmax(ref_hidden @ weight.T, -1).gather(-1, targets[:, None]).squeeze(-1)
        ref.sum().backward()
        if n == 0:
            return 0.0, 0.0, logps.numel()
        return ((logps.double() - ref).abs().max().item(), (hidden.grad.double() - ref_hidden.grad).abs().max().item(),
                logps.numel())


@pytest.mark.timeout(120)
@pytest.mark.parametrize("counts", [(10, 5), (10, 0)], ids=["fewer-chunks", "no-positions"])
def test_ranks_with_different_chunk_counts(ray_session, counts):
    # The role is defined here, so workers get it by value rather than importing this module.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    group = ActorGroup("zero3-head", RayConfig(num_actors=2, cpus_per_actor=1.0))
    try:
        group.setup(HeadRole)
        # Chunks of 4: rank 0 runs 3, rank 1 would run 2 (10 vs 5 positions) or none (10 vs 0).
        results = group.call("score", per_rank=[(n, 4) for n in counts])
    finally:
        group.kill()  # also after a timeout, with the ranks stuck in a collective
    for (logp_err, grad_err, num), n in zip(results, counts):
        assert num == n
        assert logp_err < 1e-5 and grad_err < 1e-5


@pytest.mark.timeout(180)
def test_sft_bf16_zero3_final_eval_with_a_padding_only_rank(ray_session, tmp_path, quick):
    """The reported hang: bf16 (autocast on CPU), ZeRO-3, 2 ranks, 12 eval rows in micro-batches
    of 16, so rank 1's one eval micro-batch is all padding. ZeRO-3 gives ZeRO-0's numbers."""
    from rlhf import sft

    def run(stage):
        cfg = load_config(sft.SFTConfig, "configs/sft/default.yaml", quick(
            tmp_path / f"zero{stage}", **{
                "train.max_steps": 2, "train.log_every": 1, "train.save_every": 0, "train.eval_every": 0,
                "train.eval_before_training": True,
                "final_samples": 0, "data.train": '[{path: "builtin:sft", max_rows: 64}]',
                "data.eval": '[{path: "builtin:sft_eval", max_rows: 12}]',
                "deepspeed.zero_stage": stage, "deepspeed.micro_batch_size": 16,
                "deepspeed.param_persistence_threshold": 0, "deepspeed.precision": "bf16",
                "deepspeed.precision_fallback": "keep", "ray.num_actors": 2, "ray.cpus_per_actor": 1}))
        assert cfg.deepspeed.uses_autocast(on_gpu=False)
        return sft.run(cfg, reuse=False)

    zero3, zero0 = run(3), run(0)
    steps3, steps0 = _losses(tmp_path / "zero3"), _losses(tmp_path / "zero0")
    assert len(steps3) == len(steps0) == 2
    # Before any update both evaluate and train the same weights: only the summation order differs.
    assert zero3["initial_eval"]["eval/loss"] == pytest.approx(zero0["initial_eval"]["eval/loss"], rel=1e-6)
    assert steps3[0] == pytest.approx(steps0[0], rel=1e-6)
    # After an update the weights differ in the last fp32 bits (ZeRO-3's reduce-scatter against
    # ZeRO-0's all-reduce), and a weight whose bf16 rounding flips moves it by 2^-8: observed 1.3e-5.
    assert zero3["final_eval"]["eval/loss"] == pytest.approx(zero0["final_eval"]["eval/loss"], rel=1e-4)


def _losses(run_dir):
    with open(run_dir / "metrics.jsonl") as fh:
        return [row["loss"] for row in map(json.loads, fh) if "loss" in row]
