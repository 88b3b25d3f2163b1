"""Failures while running, through the real command: a checkpoint write that fails halfway
(exit 1, GroupError's line last, the previous checkpoint kept and resumed from), a user's
mistake only an actor sees (still one line, exit 2), and Ctrl-C (exit 130 within 10 s, no actor
left, the last checkpoint resumed from)."""

import json
import os
import shutil
import signal
import subprocess
import time

import pytest

from tests.errors.helpers import BIN, ROOT, pair_rows, run_command, write_jsonl

pytestmark = pytest.mark.slow


def sft_args(run_dir, *extra):
    return ["sft", "--config", "configs/sft/default.yaml", f"run_dir={run_dir}", "tracking.backend=none",
            "final_samples=0", "train.eval_every=0", "data.eval=[]", "deepspeed.micro_batch_size=8", *extra]


def latest(run_dir):
    with open(os.path.join(run_dir, "checkpoints", "latest")) as fh:
        return fh.read().strip()


@pytest.fixture
def op_dir_with_stale_lock(tmp_path):
    """A copy of this environment's built deepspeed_shm_comm op with a lock a killed build left."""
    from align.engine.deepspeed_engine import op_build_dir

    src = op_build_dir("deepspeed_shm_comm")
    if not os.path.exists(os.path.join(src, "deepspeed_shm_comm.so")):
        pytest.skip("deepspeed_shm_comm is not built (launch/env.sh builds it)")
    root = tmp_path / "torch_extensions"
    shutil.copytree(src, root / "deepspeed_shm_comm", symlinks=True)  # copy2: mtimes kept, ninja has nothing to do
    lock = root / "deepspeed_shm_comm" / "lock"
    lock.write_text("")
    os.utime(lock, (time.time() - 3600, time.time() - 3600))
    return str(root), str(lock)


def test_checkpoint_write_fails_halfway_then_resumes(tmp_path, op_dir_with_stale_lock):
    run_dir = tmp_path / "sft"
    args = sft_args(run_dir, "train.max_steps=6", "train.save_every=2")
    # The write of step 4 raises after DeepSpeed wrote the model and optimizer, before the rename.
    failed = run_command("align-run", *args, env={"ALIGN_FAULT": "checkpoint@4"})
    assert failed.rc == 1, failed.stderr
    assert failed.lines[-1] == ("error: group 'sft' rank 0 failed: "
                                "RuntimeError: fault injected by ALIGN_FAULT=checkpoint@4")
    assert latest(run_dir) == "step2"
    assert os.path.isdir(run_dir / "checkpoints" / "step4.tmp")  # the half-written save, never `latest`
    # The rerun resumes from step 2; the stale build lock (a killed compile) is cleared, not waited on.
    extensions, lock = op_dir_with_stale_lock
    rerun = run_command("align-run", *args, env={"TORCH_EXTENSIONS_DIR": extensions})
    assert rerun.rc == 0, rerun.stderr
    assert "sft: resuming at step 2 of 6" in rerun.stderr
    assert f"[align] warning: removed the stale build lock {lock} (it is " in rerun.stderr
    assert not os.path.exists(lock)
    done = json.load(open(run_dir / "DONE.json"))
    assert done["steps"] == 6


def test_user_error_inside_an_actor_is_one_line(tmp_path):
    """Online DPO's prompt file is read only by the workers: its bad row still prints one line, exit 2."""
    prompts = write_jsonl(tmp_path / "online.jsonl", [{"prompt": "Review a film."}, {"prompt": ""}])
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(64))
    result = run_command(
        "align-run", "dpo", "--config", "configs/dpo/default.yaml", f"run_dir={tmp_path / 'dpo'}",
        "model.name_or_path=builtin:tiny-1m", "tracking.backend=none", "final_samples=0",
        f"data.train=[{{path: {data}}}]", "data.eval=[]", "online.rounds=1", "online.steps_per_round=1",
        f"online.prompts.path={prompts}", "online.labeller=gold")
    assert result.rc == 2, result.stderr
    assert result.lines[-1] == f"error: {prompts}: row 1, field 'prompt': empty string (rows are numbered from 0)"
    assert "Traceback" not in result.stderr


def _marked_processes(marker):
    """Pids of live processes whose environment carries `marker` (our driver's Ray and actors)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                if marker.encode() not in fh.read():
                    continue
            with open(f"/proc/{pid}/stat") as fh:
                if fh.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
        except OSError:
            continue
        found.append(int(pid))
    return found


@pytest.mark.parametrize("command", ["align-run", "align-pipeline"])
def test_ctrl_c_stops_everything_and_the_rerun_resumes(tmp_path, command):
    run_dir = tmp_path / "sft"
    marker = f"ALIGN_TEST_MARKER={os.getpid()}-{tmp_path.name}"
    if command == "align-run":
        args = sft_args(run_dir, "train.max_steps=100000", "train.save_every=3")
    else:
        pipeline = {"name": "sigint", "run_root": str(tmp_path), "shared": {"tracking": {"backend": "none"}},
                    "stages": {"sft": {"stage": "sft", "overrides": {
                        "final_samples": 0, "data": {"eval": []},
                        "train": {"max_steps": 100000, "save_every": 3, "eval_every": 0}}}},
                    "evaluation": {"enabled": False}}
        (tmp_path / "pipeline.yaml").write_text(json.dumps(pipeline))
        args = ["--config", str(tmp_path / "pipeline.yaml")]
    env = {**os.environ, marker.split("=")[0]: marker.split("=")[1]}
    proc = subprocess.Popen([os.path.join(BIN, command), *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not os.path.exists(run_dir / "checkpoints" / "latest"):
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.2)
        time.sleep(1.0)  # mid-training, maybe mid-save
        start = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
        elapsed = time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()
    print(f"{command}: SIGINT to exit {elapsed:.1f} s")
    assert proc.returncode == 130, stderr
    assert elapsed < 10, elapsed
    assert stderr.strip().splitlines()[-1] == \
        "error: interrupted; the newest complete checkpoint is kept (rerun to resume)"
    time.sleep(0.5)
    assert _marked_processes(marker.split("=")[1]) == []  # no actor, raylet or worker left
    step = int(latest(run_dir)[4:])
    assert step >= 3 and step % 3 == 0
    if command == "align-run":
        rerun = run_command("align-run", *sft_args(run_dir, f"train.max_steps={step + 2}", "train.save_every=3"))
    else:
        rerun = run_command("align-pipeline", "--config", tmp_path / "pipeline.yaml",
                            f"sft.train.max_steps={step + 2}")
    assert rerun.rc == 0, rerun.stderr
    assert f"sft: resuming at step {step} of {step + 2}" in rerun.stderr
    assert json.load(open(run_dir / "DONE.json"))["steps"] == step + 2
