"""One ZeRO-0 rank: the engine takes two shortcuts that must not change the training.

- no gradient all-reduce (on one rank it is the identity, but DeepSpeed still copies every
  gradient into a flat buffer and back);
- AdamW's fused kernel (optim.fused, the default).

The engine's run is compared with the same three steps written out in plain torch: AdamW with
the fused kernel, gradients clipped to norm 1.0. Runs in a subprocess, which owns its 1-rank gloo
process group, so the test session's own state is untouched.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent("""
    import json, os, socket
    import torch

    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))

    from align.config import DeepSpeedConfig, ModelConfig, OptimConfig
    from align.engine import deepspeed_engine as de
    from align.models.builders import build_causal_lm
    from align.models.logprobs import sequence_logprobs
    from align.models.tokenizer import build_builtin_tokenizer

    de.init_distributed("gloo")
    tok = build_builtin_tokenizer()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(5, 500, (4, 12), generator=g) for _ in range(3)]
    ones = torch.ones(4, 12, dtype=torch.long)
    optim = OptimConfig(lr=1e-2, grad_clip=1.0)

    def loss_of(model, ids):
        return -sequence_logprobs(model, ids, ones, ones, padding_free=True).sum.sum() / 44

    engine = de.init_train_engine(build_causal_lm(ModelConfig(), tok, seed=0), DeepSpeedConfig(micro_batch_size=4),
                                  optim, total_steps=3)
    engine_losses, norms = [], []
    for ids in batches:
        loss = loss_of(engine, ids)
        engine.backward(loss)
        de.optimizer_step(engine)
        engine_losses.append(loss.item())
        norms.append(de.step_metrics(engine)["grad_norm"])

    plain = build_causal_lm(ModelConfig(), tok, seed=0)
    opt = torch.optim.AdamW(plain.parameters(), lr=1e-2, weight_decay=0.0, fused=True)
    plain_losses, plain_norms = [], []
    for ids in batches:
        loss = loss_of(plain, ids)
        loss.backward()
        plain_norms.append(torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0).item())
        opt.step()
        opt.zero_grad()
        plain_losses.append(loss.item())
    diff = max((a - b).abs().max().item() for a, b in zip(engine.module.parameters(), plain.parameters()))
    print("RESULT " + json.dumps({
        "allreduce": engine.enable_backward_allreduce, "fused": engine.optimizer.defaults.get("fused"),
        "engine": engine_losses, "plain": plain_losses, "norms": norms, "plain_norms": plain_norms,
        "max_param_diff": diff}))
    de.teardown(barrier=False)
    os._exit(0)
""")


def test_one_zero0_rank_trains_like_plain_torch(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    r = json.loads(lines[-1][len("RESULT "):])
    assert r["allreduce"] is False and r["fused"] is True
    # Clipping is active (norms above 1.0), so a wrong norm would change the update.
    assert min(r["plain_norms"]) > 1.0
    assert r["engine"] == pytest.approx(r["plain"], rel=1e-6)
    assert r["norms"] == pytest.approx(r["plain_norms"], rel=1e-5)
    assert len(set(r["engine"])) == 3
    assert r["max_param_diff"] < 1e-6
