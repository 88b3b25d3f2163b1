"""A model from `from_pretrained` trains in train mode and gradient checkpointing really applies,
under ZeRO stages 0 to 3 (issue: before, such a model stayed in eval mode, so dropout and
checkpointing were silently off until the first evaluation).

Memory is measured as the bytes of activations saved for backward by one training forward
(saved-tensor hooks): deterministic, unlike RSS on a shared machine. Runs in a subprocess with
its own 1-rank gloo group.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent("""
    import json, os, socket, sys
    import torch

    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))

    from align.config import DeepSpeedConfig, ModelConfig, OptimConfig
    from align.engine import deepspeed_engine as de
    from align.models.builders import build_causal_lm, save_pretrained
    from align.models.logprobs import sequence_logprobs
    from align.models.tokenizer import build_builtin_tokenizer

    de.init_distributed("gloo")
    tok = build_builtin_tokenizer()
    saved_dir = sys.argv[1]
    save_pretrained(build_causal_lm(ModelConfig(name_or_path="builtin:tiny-1m"), tok, seed=0), tok, saved_dir)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 500, (4, 96), generator=g)
    ones = torch.ones_like(ids)
    out = {}
    # Off and on under ZeRO-0 and ZeRO-3; on only under 1 and 2 (compared with ZeRO-0 off).
    for stage, gc in ((0, False), (0, True), (1, True), (2, True), (3, False), (3, True)):
        model = build_causal_lm(ModelConfig(name_or_path=saved_dir, gradient_checkpointing=gc), tok)
        loaded_training = model.training
        engine = de.init_train_engine(model, DeepSpeedConfig(zero_stage=stage, micro_batch_size=4,
                                                             param_persistence_threshold=0),
                                      OptimConfig(lr=1e-3), total_steps=1)
        saved = [0]

        def pack(t):
            saved[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = -sequence_logprobs(engine, ids, ones, ones).sum.mean()
        engine.backward(loss)
        de.optimizer_step(engine)
        norm = de.step_metrics(engine)["grad_norm"]
        engine.eval()
        eval_mode = not engine.module.training
        engine.train()
        out[f"{stage}-{gc}"] = {"loaded_training": loaded_training, "training": engine.module.training,
                                "saved_bytes": saved[0], "loss": loss.item(), "grad_norm": norm,
                                "eval_mode": eval_mode}
        del engine
    print("RESULT " + json.dumps(out))
    de.teardown(barrier=False)
    os._exit(0)
""")


def test_from_pretrained_trains_in_train_mode_and_checkpointing_lowers_memory(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "model")], env=env,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                          capture_output=True, text=True, timeout=480)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT "):])
    print({k: (v["saved_bytes"], round(v["loss"], 4)) for k, v in out.items()})
    for stage in (0, 1, 2, 3):
        off, on = out.get(f"{stage}-False", out["0-False"]), out[f"{stage}-True"]
        for r in (off, on):
            assert r["loaded_training"] is False  # what from_pretrained returns ...
            assert r["training"] is True  # ... and what the training engine runs
            assert r["eval_mode"] is True
        # Checkpointing keeps only each layer's input for backward: well under half the bytes.
        assert on["saved_bytes"] < 0.5 * off["saved_bytes"], (stage, on["saved_bytes"], off["saved_bytes"])
        # ... and changes nothing else: same loss, same gradient.
        assert on["loss"] == pytest.approx(off["loss"], rel=1e-6)
        assert on["grad_norm"] == pytest.approx(off["grad_norm"], rel=1e-4)
    assert out["0-False"]["loss"] == pytest.approx(out["3-False"]["loss"], rel=1e-6)
