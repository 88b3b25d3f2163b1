"""What the side-by-side benchmarks (bench_*.py) share. Not a benchmark itself.

- `prepare`: the same starting weights and data for both frameworks. builtin:tiny-30m (seed 0) and
  its tokenizer are saved ONCE with `save_pretrained` (a scalar-head copy too, for reward models),
  and the rows of a built-in split are written ONCE as JSONL with the prompt already rendered
  through the chat template, so our data layer (`use_chat_template=false`) and TRL's tokenizer
  produce the same token ids (each benchmark checks this).
- `batch_order`: our BatchIterator's epoch-0 order; TRL reads the same rows in that order with a
  sequential sampler, so step k of both sees the same micro-batch.
- Tokens: per step, the non-pad tokens of every sequence the policy forwards (prompt + response;
  chosen and rejected both), computed from the shared tokenization, the same numbers for both.
- `run_child`: runs one repetition in a fresh process and samples the memory of its process tree
  every 2 s with psutil (the tree rescanned every 4 s): PSS summed (ours: driver + Ray actor, and
  with Ray's daemons and idle workers; TRL: its one process), and the peak RSS (the kernel's
  high-water mark, VmHWM) of the training process (our actor; TRL's process).
- `peak_flops`: best of 5 timed torch.matmul (2048^3, fp32) with the training's thread count.
  MFU = 6 x params x tokens/s (+2 x params x tokens/s per reference forward) / that peak: the
  model FLOPs the task needs (PaLM's definition). Executed-FLOP utilization counts the positions
  each framework really forwards instead (pad positions included, shared prompts once).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results")
WORK = os.environ.get("ALIGN_BENCH_WORK", "/tmp/align-bench")
MODEL = "builtin:tiny-30m"
SEED = 0
MAX_LENGTH, MAX_PROMPT_LENGTH = 128, 48
# The venv's own op folder when launch/env.sh set one (built there at set-up), else one of our own.
EXTENSIONS = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(WORK, "torch_extensions")


def model_slug(model: str) -> str:
    """A folder name for `model` (a builtin name or a path)."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in model.replace("builtin:", "")).strip("-")


def prepare(split: str, rows: int, scalar: bool = False, model: str = MODEL) -> Dict[str, str]:
    """{"model": dir, "data": jsonl} (saved once under WORK; reused when present).

    `model`: builtin:tiny-* is built (seed 0) and saved; any other model (builtin:smollm2-135m-instruct,
    a folder) is used from its plain folder (a GGUF file is dequantised once, align.models.sources), with
    a scalar-head copy saved for reward models. The prompts are rendered with that model's chat template."""
    os.makedirs(WORK, exist_ok=True)
    os.environ.setdefault("HF_HOME", os.path.join(WORK, "hf"))
    from align.config import ModelConfig
    from align.models.builders import build_causal_lm, build_scalar_model, build_tokenizer, save_pretrained
    from align.models.sources import resolve_source

    slug = model_slug(model)
    if model.startswith("builtin:tiny") or scalar:
        model_dir = os.path.join(WORK, f"{slug}-rm" if scalar else slug)
        if not os.path.exists(os.path.join(model_dir, "config.json")):
            cfg = ModelConfig(name_or_path=model)
            tokenizer = build_tokenizer(cfg)
            built = (build_scalar_model if scalar else build_causal_lm)(cfg, tokenizer, seed=SEED)
            save_pretrained(built, tokenizer, model_dir)
    else:
        model_dir = resolve_source(model)
    data = os.path.join(WORK, f"{split}-{rows}.jsonl" if slug == "tiny-30m" else f"{split}-{rows}-{slug}.jsonl")
    if not os.path.exists(data):
        from align.task.synthetic import builtin_path

        tok = build_tokenizer(ModelConfig(name_or_path=model_dir))
        with open(builtin_path(split, SEED)) as fh:
            src = [json.loads(line) for _, line in zip(range(rows), fh)]
        with open(data + ".tmp", "w") as out:
            for r in src:
                msgs = [{"role": "user", "content": r["prompt"]}]
                r["prompt"] = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
                out.write(json.dumps(r) + "\n")
        os.replace(data + ".tmp", data)
    return {"model": model_dir, "data": data}


def data_config(path: str):
    from align.config import DataConfig, SourceConfig

    return DataConfig(train=[SourceConfig(path=path)], eval=[], max_length=MAX_LENGTH,
                      max_prompt_length=MAX_PROMPT_LENGTH, use_chat_template=False)


def our_tokens(kind: str, path: str, model_dir: str) -> List[List[List[int]]]:
    """Our data layer's token ids per row: [sequence, ...] as the policy forwards them."""
    from align.config import ModelConfig
    from align.data.errors import DataReport
    from align.data.sources import load_splits
    from align.data.tokenize import tokenize_rows
    from align.models.builders import build_tokenizer

    tok = build_tokenizer(ModelConfig(name_or_path=model_dir))
    train, _ = load_splits(data_config(path), kind, SEED, DataReport())
    ds = tokenize_rows(train, kind, tok, data_config(path))
    if kind == "sft":
        return [[list(x)] for x in ds["input_ids"]]
    if kind == "binary":
        return [[list(p) + list(c)] for p, c in zip(ds["prompt_ids"], ds["completion_ids"])]
    return [[list(p) + list(c), list(p) + list(r)]
            for p, c, r in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"])]


def our_prompt_lengths(path: str, model_dir: str) -> List[int]:
    """Prompt length of each pairwise row in our tokenization (what a shared-prompt forward saves)."""
    from align.config import ModelConfig
    from align.data.errors import DataReport
    from align.data.sources import load_splits
    from align.data.tokenize import tokenize_rows
    from align.models.builders import build_tokenizer

    tok = build_tokenizer(ModelConfig(name_or_path=model_dir))
    train, _ = load_splits(data_config(path), "pairwise", SEED, DataReport())
    return [len(p) for p in tokenize_rows(train, "pairwise", tok, data_config(path))["prompt_ids"]]


def batch_order(rows: int, micro_batch: int, steps: int) -> List[List[int]]:
    """Row indices of each step's micro-batch, exactly as our BatchIterator (1 rank) yields them."""
    from align.data.batching import BatchIterator

    it = BatchIterator(list(range(rows)), micro_batch, SEED)
    return [it.indices(0, b) for b in range(steps)]


def our_metrics(run_dir: str) -> dict:
    """Per-step loss, the stage's own token count and step time (tokens / tokens_per_s) from metrics.jsonl."""
    from align.tracking import read_metrics

    steps = [m for m in read_metrics(run_dir) if "tokens_per_s" in m]
    return {"loss": [m["loss"] for m in steps], "tokens": [m["tokens"] for m in steps],
            "step_s": [m["tokens"] / m["tokens_per_s"] for m in steps]}


def step_tokens(seqs: List[List[List[int]]], order: List[List[int]],
                prompt_lengths: Optional[List[int]] = None) -> Dict[str, List[int]]:
    """Per step: non-pad tokens; padded tokens (rows x widest row, right padding as TRL does);
    and the positions a shared-prompt forward runs (each pair's prompt once), when given."""
    real, padded, shared = [], [], []
    for idx in order:
        lens = [len(s) for i in idx for s in seqs[i]]
        real.append(sum(lens))
        padded.append(len(lens) * max(lens))
        shared.append(sum(lens) - sum(prompt_lengths[i] for i in idx) if prompt_lengths else sum(lens))
    return {"real": real, "padded": padded, "shared": shared}


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------


ACTOR_TITLES = ("ray::RankActor", "ray::Worker")


class TreeRSS:
    """Peak memory of a process and its descendants, sampled every `interval` seconds.

    Sums use PSS (shared pages split between the processes that map them, so Ray's shared object
    store and libraries are not counted once per process); `train_rss` is the RSS of the process
    that trains (TRL: the process itself; ours: the Ray actor)."""

    def __init__(self, pid: int, interval: float = 2.0, rescan: float = 4.0):
        import psutil

        self.root, self.interval, self.rescan, self.peak = psutil.Process(pid), interval, rescan, {}
        self.procs: Dict[int, tuple] = {}  # pid -> (Process, category); the tree is rescanned every `rescan` s
        self._scanned = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _scan(self) -> None:
        import psutil

        try:
            found = [self.root] + self.root.children(recursive=True)
        except psutil.Error:
            return
        for p in found:
            # A new Ray worker takes its actor's title ("ray::RankActor.<method>", align.engine.ray_group; older
            # versions "ray::Worker") only once running: classify again until then.
            if self.procs.get(p.pid, (None, "ray_other"))[1] == "ray_other":
                try:
                    cmd = " ".join(p.cmdline()[:1])
                except psutil.Error:
                    continue
                key = "driver" if p.pid == self.root.pid else "actors" if cmd.startswith(ACTOR_TITLES) else "ray_other"
                self.procs[p.pid] = (p, key)
        self._scanned = time.monotonic()

    def _sample(self) -> Dict[str, int]:
        import psutil

        if time.monotonic() - self._scanned > self.rescan:
            self._scan()
        parts = {"driver": 0, "actors": 0, "ray_other": 0, "train_rss": 0}
        for pid, (p, key) in list(self.procs.items()):
            try:
                mem = p.memory_full_info()
            except psutil.Error:
                self.procs.pop(pid, None)
                continue
            parts[key] += mem.pss
            if key != "ray_other":
                # The kernel's high-water mark: exact however rarely it is sampled.
                parts["train_rss"] = max(parts["train_rss"], _peak_rss(pid) or mem.rss)
        parts["driver+actors"] = parts["driver"] + parts["actors"]
        parts["tree"] = parts["driver+actors"] + parts["ray_other"]
        return parts

    def _loop(self) -> None:
        self.loads: List[float] = []
        while not self._stop.is_set():
            for k, v in self._sample().items():
                self.peak[k] = max(self.peak.get(k, 0), v)
            self.loads.append(os.getloadavg()[0])
            self._stop.wait(self.interval)

    def stop(self) -> Dict[str, int]:
        self._stop.set()
        self._thread.join()
        return self.peak


def self_rss() -> int:
    """This process's resident set now (bytes)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class SelfPeakRSS:
    """`with SelfPeakRSS() as m: ...` samples this process's RSS every `interval` s while the block
    runs; `m.start` is the RSS on entry, `m.peak` the highest seen (the in-process memory scripts)."""

    def __init__(self, interval: float = 0.002):
        self.interval, self._stop = interval, threading.Event()

    def __enter__(self) -> "SelfPeakRSS":
        self.start = self.peak = self_rss()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self_rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self_rss())


def _peak_rss(pid: int) -> int:
    """VmHWM of a process (bytes), 0 when unreadable."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        return 0


def run_child(script: str, args: Sequence[str], result: str, extra_env: Optional[Dict[str, str]] = None) -> dict:
    """Runs `python script args` in a fresh process; returns its JSON result + wall and peak memory."""
    env = dict(os.environ, RAY_AUTH_MODE="disabled", WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false",
               TQDM_DISABLE="1", OMP_NUM_THREADS=str(os.cpu_count()), PYTHONPATH=REPO, TORCH_EXTENSIONS_DIR=EXTENSIONS,
               **(extra_env or {}))
    log = open(result + ".log", "w")
    launched_at = time.time()  # the child reports when its first step began (`first_step_at`, Unix time)
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, script, *args], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    rss = TreeRSS(proc.pid)
    code = proc.wait()
    wall = time.perf_counter() - started
    peak = rss.stop()
    load = statistics.mean(rss.loads) if rss.loads else os.getloadavg()[0]
    log.close()
    if code != 0:
        with open(result + ".log") as fh:
            raise RuntimeError(f"{script} {' '.join(args)} failed ({code}):\n{fh.read()[-4000:]}")
    with open(result) as fh:
        out = json.load(fh)
    if out.get("first_step_at"):
        out["startup_s"] = out["first_step_at"] - launched_at  # the command to the first step's start
    return dict(out, wall_s=wall, peak_rss=peak, load=load)


def prebuild_deepspeed_ops() -> float:
    """Builds DeepSpeed's shm comm op (g++, ~22 s, 1.5 GB per compiler process) into a directory of
    this benchmark's own, once, so that no measured run compiles it. (In the shared default
    ~/.cache/torch_extensions, other checkouts' builds invalidate ours and every run rebuilt it.)"""
    os.environ["TORCH_EXTENSIONS_DIR"] = EXTENSIONS
    started = time.perf_counter()
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        builder.load(verbose=False)
    return time.perf_counter() - started


def peak_flops(threads: Optional[int] = None, n: int = 2048, reps: int = 5, dtype: str = "fp32") -> float:
    """Best observed FLOP/s of an n^3 matmul in `dtype` (fp32 | bf16) with `threads` threads."""
    import torch

    torch.set_num_threads(threads or os.cpu_count())
    kind = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    a, b = torch.randn(n, n).to(kind), torch.randn(n, n).to(kind)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def mfu(params: int, tokens_per_s: float, peak: float, forwards_without_grad: int = 0) -> float:
    return (6 + 2 * forwards_without_grad) * params * tokens_per_s / peak


# Steps left out of the steady state: in both frameworks the first two or three steps run 1.5-3x
# slower (allocator and kernel warm-up).
WARMUP_STEPS = 3


def steady(step_times: List[float], tokens: List[int], skip: int = WARMUP_STEPS) -> Dict[str, float]:
    """Tokens/s and median step time over the steps after the first `skip` (warm-up)."""
    t, n = step_times[skip:], tokens[skip:len(step_times)]
    return {"tokens_per_s": sum(n) / sum(t), "step_s": statistics.median(t)}


def spread(values: Sequence[float], fmt: str = "{:.0f}") -> str:
    """'median (min-max, n=k)'."""
    lo, mid, hi = (fmt.format(x) for x in (min(values), statistics.median(values), max(values)))
    return f"{mid} ({lo}-{hi}, n={len(values)})"


def machine() -> Dict[str, object]:
    """The machine and versions: {"machine": one line, "versions": one line, "cpu": {model, bf16 flags, ...},
    "cores", "ram_gib", "python", "packages": {name: version}}."""
    from importlib.metadata import PackageNotFoundError, version

    import psutil

    from align.precision import describe_cpu

    cpu = describe_cpu()
    if cpu["model"] == "unknown CPU":
        cpu["model"] = platform.processor() or platform.machine()
    packages = {}
    for name in ("torch", "transformers", "deepspeed", "ray", "datasets", "trl", "accelerate"):
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            packages[name] = None
    bf16 = (f"bf16 hardware ({', '.join(cpu['bf16_flags'])})" if cpu["bf16_flags"]
            else "no bf16 hardware (no amx_bf16/avx512_bf16)")
    ram = psutil.virtual_memory().total / 2**30
    return {"machine": f"{cpu['model']}, {os.cpu_count()} cores, {bf16}, {ram:.0f} GiB RAM, "
                       f"Python {platform.python_version()}",
            "versions": ", ".join(f"{k} {v or '-'}" for k, v in packages.items()),
            "cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(ram, 1), "python": platform.python_version(),
            "packages": packages}


def load_line() -> str:
    """The 1-minute load average, and how many of this machine's cores it is."""
    one = os.getloadavg()[0]
    return f"{one:.2f} ({one / os.cpu_count():.0%} of {os.cpu_count()} cores)"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def ratios(values: Dict[str, Dict[str, float]], keys: Sequence[str]) -> Dict[str, Dict[str, Dict[str, float]]]:
    """{variant: {peer: {key: variant's value / peer's}}} for every other variant (None where undefined)."""
    return {v: {w: {k: (round(values[v][k] / values[w][k], 4) if values[v].get(k) is not None and values[w].get(k)
                        else None) for k in keys}
                for w in values if w != v} for v in values}


def write_json(stage: str, data: dict) -> str:
    """benchmarks/results/<stage>.json, beside the Markdown: what a script compares across reruns."""
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{stage}.json")
    with open(path, "w") as fh:
        json.dump(data, fh, indent=1)
        fh.write("\n")
    return path


def write_result(stage: str, text: str) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{stage}.md")
    with open(path, "w") as fh:
        fh.write(text.rstrip() + "\n")
    return path


MIB = 2**20
