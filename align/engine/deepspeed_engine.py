"""The one module that owns DeepSpeed.

It turns a stage config into a DeepSpeed config, builds train / eval-only engines, gathers
ZeRO-3 parameters for generation and export, writes atomic checkpoints, and tears the process
group down cleanly. Stages never import deepspeed themselves.
"""

from __future__ import annotations

import gc
import json
import math
import os
import random
import re
import shutil
from contextlib import contextmanager
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.distributed as dist

from align.config import ConfigError, DeepSpeedConfig, OptimConfig
from align.errors import fault_point

LATEST = "latest"
_STEP_DIR = re.compile(r"^step(\d+)$")


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


def build_ds_config(ds: DeepSpeedConfig, optim: OptimConfig, world_size: int, train: bool = True) -> Dict[str, Any]:
    """The DeepSpeed JSON for one engine. Keys of `ds.raw_config` (a user's file) win."""
    zero: Dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1 and ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds.zero_stage == 3:
        if ds.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        if ds.param_persistence_threshold is not None:
            zero["stage3_param_persistence_threshold"] = ds.param_persistence_threshold
        # Export gathers full weights on rank 0 (save_16bit_model).
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    config: Dict[str, Any] = {
        "train_micro_batch_size_per_gpu": ds.micro_batch_size,
        "gradient_accumulation_steps": ds.grad_accum_steps if train else 1,
        "train_batch_size": ds.micro_batch_size * (ds.grad_accum_steps if train else 1) * world_size,
        "zero_optimization": zero,
        "gradient_clipping": optim.grad_clip if train else 0.0,
        # With autocast the model stays fp32 for DeepSpeed (align.models.autocast does the bf16).
        "bf16": {"enabled": ds.precision == "bf16" and not ds.uses_autocast(torch.cuda.is_available())},
        "fp16": {"enabled": ds.precision == "fp16", "initial_scale_power": 16},
        # A torch optimizer may be offloaded too; no cpu_adam build needed.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if ds.raw_config:
        if not os.path.exists(ds.raw_config):
            raise ConfigError(f"deepspeed.raw_config: file not found: {ds.raw_config}")
        try:
            with open(ds.raw_config) as fh:
                user = json.load(fh)
        except json.JSONDecodeError as err:
            raise ConfigError(f"deepspeed.raw_config: {ds.raw_config}: not valid JSON: {err}") from None
        if not isinstance(user, dict):
            raise ConfigError(f"deepspeed.raw_config: {ds.raw_config}: expected a JSON object, "
                              f"got {type(user).__name__}")
        config = _deep_update(config, user)
    return config


def _deep_update(base: Dict[str, Any], new: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for key, value in new.items():
        out[key] = _deep_update(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def lr_lambda(optim: OptimConfig, total_steps: int):
    """Multiplier of the base LR at each step: linear warm-up, then constant, linear or cosine."""
    warmup, total = optim.warmup_steps, max(total_steps, 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if optim.scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if optim.scheduler == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


# ---------------------------------------------------------------------------------------------
# Process group
# ---------------------------------------------------------------------------------------------


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


# The DeepSpeed ops a CPU run compiles on first use (launch/env.sh builds them at set-up).
CPU_OPS = ("deepspeed_shm_comm",)


def op_build_dir(name: str) -> str:
    """Where torch builds op `name`: $TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions/<py>_<cpu|cuXY>/<name>."""
    from torch.utils.cpp_extension import _get_build_directory

    return _get_build_directory(name, verbose=False)


def init_distributed(backend: str = "auto") -> None:
    """Joins the process group described by RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT."""
    import deepspeed

    if dist.is_initialized():
        return
    from align.waits import announce_wait, clear_stale_lock

    backend = default_backend() if backend == "auto" else backend
    if not torch.cuda.is_available():
        # On CPU, init_distributed builds (or loads) the deepspeed_shm_comm op under a file lock
        # that a killed build leaves behind; torch would then wait for ever, silently.
        for op in CPU_OPS:
            clear_stale_lock(os.path.join(op_build_dir(op), "lock"))
    with announce_wait(f"DeepSpeed to join the {backend} process group (rank {os.environ.get('RANK', 0)} of "
                       f"{os.environ.get('WORLD_SIZE', 1)} at {os.environ.get('MASTER_ADDR')}:"
                       f"{os.environ.get('MASTER_PORT')}; a first run also compiles its CPU ops)"):
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))


def teardown(barrier: bool = True) -> None:
    """Destroys the process group so gloo does not abort at interpreter exit.

    A gloo thread can free a pending collective during Python shutdown ("terminate called
    without an active exception"); collecting engines first and destroying the group avoids it.
    Callers drop their engine references before calling this. Skip the barrier when a peer
    may be dead (it would wait forever).
    """
    gc.collect()
    if dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()
    gc.collect()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier_if_distributed() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def to_device(batch: Dict[str, Any]) -> Dict[str, Any]:
    """Moves a collated batch's tensors to this rank's device (a no-op on CPU)."""
    dev = device()
    return {k: v.to(dev, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a copy); identity when not distributed."""
    t = t.detach().clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def loss_scale(global_count: float, micro_batches: int, floor: float = 1e-12) -> float:
    """Factor for a micro-batch's SUMMED loss so that the accumulated gradient is the gradient of
    the mean over `global_count` items (tokens, pairs, rows) of the whole global batch.

    DeepSpeed divides each backward by the gradient-accumulation steps and averages gradients
    over ranks; multiplying by world_size * micro_batches undoes both, and dividing by the
    global count makes each micro-batch's sum its share of one mean, however the batch is split.
    """
    return world_size() * micro_batches / max(global_count, floor)


# ---------------------------------------------------------------------------------------------
# Engines
# ---------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def init_train_engine(model: torch.nn.Module, ds: DeepSpeedConfig, optim: OptimConfig, total_steps: int):
    """A DeepSpeed training engine with AdamW and the configured LR schedule."""
    import deepspeed

    config = build_ds_config(ds, optim, world_size())
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # ZeRO-1/2 break on an empty group (LoRA: every trainable matrix is 2-D, no_decay is empty).
    groups = [g for g in groups if g["params"]]
    fused = optim.fused and all(p.is_floating_point() and p.device.type in ("cpu", "cuda")
                                for group in groups for p in group["params"])
    optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                                  **({"fused": True} if fused else {}))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(optim, total_steps))
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
    _maybe_autocast(engine, ds)
    # from_pretrained returns a model in eval mode: without this, dropout and gradient
    # checkpointing (which transformers applies only in training mode) stay off until the first
    # evaluation switches back with engine.train().
    engine.train()
    if world_size() == 1 and engine.zero_optimization_stage() == 0:
        # An all-reduce over one rank is the identity, but DeepSpeed still copies every gradient
        # into a flat buffer and back (about 5% of a small model's step, and a gradient-sized
        # buffer of memory).
        engine.enable_backward_allreduce = False
    return engine


def init_eval_engine(model: torch.nn.Module, ds: DeepSpeedConfig, optim: OptimConfig):
    """A frozen engine (reference or reward model): ZeRO-3 shards it, otherwise stage 0."""
    import deepspeed

    model.eval().requires_grad_(False)
    config = build_ds_config(ds, optim, world_size(), train=False)
    if ds.zero_stage != 3:
        config["zero_optimization"] = {"stage": 0}
    engine, *_ = deepspeed.initialize(model=model, config=config)
    _maybe_autocast(engine, ds)
    engine.eval()
    return engine


def _maybe_autocast(engine, ds: DeepSpeedConfig) -> None:
    if ds.uses_autocast(torch.cuda.is_available()):
        from align.models.autocast import apply_autocast

        apply_autocast(engine.module, torch.bfloat16)


def optimizer_step(engine) -> None:
    """`engine.step()`, remembering the global gradient norm (before clipping) of an update.

    DeepSpeed records the norm under ZeRO-1/2/3 but not at stage 0 with a client optimizer, so
    there it is computed here from the already all-reduced gradients. (Letting the clipping
    compute it once instead saves 1-2% of a step but changes the norm's float summation order,
    enough to send a 12-step PPO run elsewhere: kept as it is.)
    """
    if engine.is_gradient_accumulation_boundary() and engine.zero_optimization_stage() == 0:
        grads = [p.grad.detach() for p in engine.module.parameters() if p.grad is not None]
        engine._align_grad_norm = torch.stack(torch._foreach_norm(grads)).float().norm().item() if grads else None
    engine.step()


def step_metrics(engine) -> Dict[str, float]:
    """Learning rate and gradient norm of the last optimizer step, for logging."""
    norm = engine.get_global_grad_norm()
    if norm is None:
        norm = getattr(engine, "_align_grad_norm", None)
    out = {"lr": float(engine.get_lr()[0])}
    if norm is not None:
        out["grad_norm"] = float(norm)
    return out


def is_zero3(engine) -> bool:
    return getattr(engine, "zero_optimization_stage", lambda: 0)() == 3


@contextmanager
def gathered_parameters(engine):
    """Full parameters on every rank inside the block (ZeRO-3), e.g. for `generate`."""
    import deepspeed

    if is_zero3(engine):
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
            yield
    else:
        yield


def generate(engine, input_ids: torch.Tensor, attention_mask: torch.Tensor, backend: str = "auto",
             with_logprobs: bool = False, **kwargs):
    """Samples continuations of left-padded prompts. backend "auto": align.fast_generate (a
    static K/V buffer per layer, the prompt shared by identical rows) for the architectures it
    handles outside ZeRO-3, otherwise transformers' `generate`, which keeps ZeRO-3 ranks in step
    while lengths differ; "transformers": always `generate`. Returns the (B, P + N) ids; with
    `with_logprobs`, (ids, log-probs (B, N), entropies (B, N)) of the sampled tokens, both None
    when transformers sampled."""
    if backend not in ("auto", "transformers"):
        raise ValueError(f"generation backend {backend!r}: expected auto or transformers")
    module = engine.module
    was_training = module.training
    module.eval()
    zero3 = is_zero3(engine)
    from align.fast_generate import fast_generate
    from align.models.autocast import cached_casts
    from align.models.kv_decode import KVDecoder

    fast = backend == "auto" and not zero3 and KVDecoder.for_model(
        module, input_ids.shape[1] + kwargs.get("max_new_tokens", 0)) is not None
    with torch.no_grad(), cached_casts(module):
        if fast:
            out = fast_generate(module, input_ids, attention_mask, return_logprobs=with_logprobs,
                                return_entropy=with_logprobs, **kwargs)
        else:
            out = module.generate(input_ids=input_ids, attention_mask=attention_mask,
                                  synced_gpus=zero3 and world_size() > 1, **kwargs)
            out = (out, None, None) if with_logprobs else out
    module.train(was_training)
    return out


def full_state_dict(engine) -> Optional[Dict[str, torch.Tensor]]:
    """Full fp32/16-bit weights on rank 0 (None elsewhere), gathering ZeRO-3 shards."""
    if is_zero3(engine):
        state = engine._zero3_consolidated_16bit_state_dict()
        return state if rank() == 0 else None
    return {k: v.detach().cpu() for k, v in engine.module.state_dict().items()} if rank() == 0 else None


def export_hf(engine, tokenizer, out_dir: str, extra_config: Optional[Dict[str, Any]] = None,
              merge: bool = True) -> Optional[str]:
    """Exports the engine's model in Hugging Face format (safetensors); all ranks must call.
    A LoRA model is written with its adapter merged into the weights, or with `merge=False`
    as the adapter alone (peft's format, loadable with peft on the base model)."""
    from align.models import lora
    from align.models.builders import save_pretrained

    state = full_state_dict(engine)
    path = None
    if rank() == 0:
        if lora.is_lora(engine) and not merge:
            path = save_adapter_hf(engine, tokenizer, out_dir, state)
        else:
            if lora.is_lora(engine):
                state = lora.merged_state_dict(engine, state)
            path = save_pretrained(engine.module, tokenizer, out_dir, extra_config, state_dict=state)
    if dist.is_initialized():
        dist.barrier()
    return path


def save_adapter_hf(engine, tokenizer, out_dir: str, state: Dict[str, torch.Tensor]) -> str:
    """The adapter alone (and a fully trained head) plus the tokenizer, written atomically."""
    from align.models.builders import export_atomically
    from align.models.lora import save_adapter

    return export_atomically(out_dir, lambda tmp: save_adapter(engine, state, tmp), tokenizer)


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def _rng_state() -> Dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _complete_tags(ckpt_dir: str) -> list:
    """`step<k>` directories, oldest first. Only complete saves get this name (see below)."""
    if not os.path.isdir(ckpt_dir):
        return []
    tags = [d for d in os.listdir(ckpt_dir) if _STEP_DIR.match(d) and os.path.isdir(os.path.join(ckpt_dir, d))]
    return sorted(tags, key=lambda d: int(d[4:]))


def latest_checkpoint(ckpt_dir: str) -> Optional[str]:
    """Tag of the newest complete checkpoint, or None.

    That is the newest `step<k>` directory: a save gets that name only once every rank has
    written it. The `latest` file usually names the same one, but a crash between renaming a
    save and rewriting `latest` leaves it behind; it is used only when no `step<k>` exists.
    """
    tags = _complete_tags(ckpt_dir)
    if tags:
        return tags[-1]
    pointer = os.path.join(ckpt_dir, LATEST)
    if os.path.exists(pointer):
        with open(pointer) as fh:
            tag = fh.read().strip()
        if tag and os.path.isdir(os.path.join(ckpt_dir, tag)):
            return tag
    return None


def _rng_file(ckpt_dir: str, tag: str) -> str:
    return os.path.join(ckpt_dir, tag, f"rng_rank{rank()}.pt")


def save_checkpoint(engine, ckpt_dir: str, step: int, client_state: Dict[str, Any], keep: int = 2) -> str:
    """Saves model, optimizer, scheduler, RNG and `client_state` (e.g. data position).

    Atomic: ranks write `step<k>.tmp`; rank 0 renames it to `step<k>` and then points `latest`
    at it, so a crash while saving leaves the previous good checkpoint as `latest`.
    Every rank's RNG state is saved (DeepSpeed keeps `client_state` of rank 0 only, except
    under ZeRO-3), so ranks that sample differently resume exactly.
    """
    tag = f"step{step}"
    tmp_tag = f"{tag}.tmp"
    rng = _rng_state()
    state = dict(client_state, rng=rng, step=step)
    if rank() == 0:  # a crashed save of this step left files that must not end up in this one
        shutil.rmtree(os.path.join(ckpt_dir, tmp_tag), ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    # LoRA: the frozen base is not saved (it is rebuilt from model.name_or_path), so a
    # checkpoint holds the adapter, the trained head and their optimizer state only.
    engine.save_checkpoint(ckpt_dir, tag=tmp_tag, client_state=state, save_latest=False,
                           exclude_frozen_parameters=_has_frozen(engine))
    fault_point("checkpoint", step)  # tests: the write fails halfway (model written, not renamed)
    os.makedirs(os.path.join(ckpt_dir, tmp_tag), exist_ok=True)
    torch.save(rng, _rng_file(ckpt_dir, tmp_tag))
    if dist.is_initialized():
        dist.barrier()
    if rank() == 0:
        final = os.path.join(ckpt_dir, tag)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.rename(os.path.join(ckpt_dir, tmp_tag), final)
        pointer = os.path.join(ckpt_dir, LATEST)
        with open(pointer + ".tmp", "w") as fh:
            fh.write(tag)
        os.replace(pointer + ".tmp", pointer)
        _prune(ckpt_dir, keep)
    if dist.is_initialized():
        dist.barrier()
    return tag


def _has_frozen(engine) -> bool:
    return any(not p.requires_grad for p in engine.module.parameters())


def _prune(ckpt_dir: str, keep: int) -> None:
    for d in os.listdir(ckpt_dir):
        if d.startswith("step") and d.endswith(".tmp"):  # left by a crash during an earlier save
            shutil.rmtree(os.path.join(ckpt_dir, d), ignore_errors=True)
    done = _complete_tags(ckpt_dir)
    for d in done[: max(0, len(done) - max(1, keep))]:  # never the one just saved
        shutil.rmtree(os.path.join(ckpt_dir, d), ignore_errors=True)


def load_checkpoint(engine, ckpt_dir: str) -> Optional[Dict[str, Any]]:
    """Restores the newest checkpoint into `engine`; returns its client state, or None."""
    tag = latest_checkpoint(ckpt_dir)
    if tag is None:
        return None
    # Strict unless the base was left out at save time (LoRA: frozen params are not saved).
    _, client_state = engine.load_checkpoint(ckpt_dir, tag=tag, load_module_strict=not _has_frozen(engine))
    if client_state is None:
        raise RuntimeError(f"{ckpt_dir}/{tag}: checkpoint could not be loaded")
    rng_file = _rng_file(ckpt_dir, tag)
    # This rank's own RNG; a checkpoint from an older version or a larger world has none.
    rng = _load_rng(rng_file) if os.path.exists(rng_file) else client_state["rng"]
    _set_rng_state(rng)
    return client_state


# What an RNG file holds besides tensors and plain Python values: numpy's MT19937 key array.
_RNG_SAFE_GLOBALS = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), np.zeros(0).__reduce__()[0]]


def _load_rng(path: str) -> Dict[str, Any]:
    """A rank's RNG file, with weights_only=True: only tensors, plain values and numpy arrays
    are allowed to load, so a tampered file cannot run code. (DeepSpeed's own checkpoint files,
    with the optimizer state and client_state, are loaded by `engine.load_checkpoint`, which
    passes weights_only=False; see the README's security section.)"""
    with torch.serialization.safe_globals(_RNG_SAFE_GLOBALS):
        return torch.load(path, weights_only=True)

