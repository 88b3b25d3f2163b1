"""Light modules stay light: losses and math import without DeepSpeed, Ray or transformers."""

import json
import os
import subprocess
import sys

# Pure torch + standard library.
TORCH_ONLY = ["direct.losses", "rlhf.ppo_math", "reward_model.loss", "align.models.logprobs",
              "rlhf.advantages", "rlhf.policy_loss"]
# May use omegaconf and the standard library, never DeepSpeed or Ray.
NO_DISTRIBUTED = TORCH_ONLY + ["align.config", "align.task.synthetic", "align.data", "align.task.json_records",
                               "reward_model.rewards"]


def imported_after(modules):
    code = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def top_level(modules):
    return {m.split(".")[0] for m in modules}


def test_no_distributed_stack():
    loaded = top_level(imported_after(NO_DISTRIBUTED))
    assert "deepspeed" not in loaded
    assert "ray" not in loaded
    assert {"torch", "omegaconf"} <= loaded  # the check itself sees imports


def test_losses_import_only_torch():
    loaded = top_level(imported_after(TORCH_ONLY))
    for heavy in ("transformers", "datasets", "deepspeed", "ray", "omegaconf", "tokenizers"):
        assert heavy not in loaded, heavy
    assert "torch" in loaded
