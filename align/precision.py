"""Does this machine run the asked reduced precision in hardware? Decided on the driver, before
Ray or DeepSpeed starts.

bf16 on a CPU without bf16 instructions is emulated: an AVX2-only AMD EPYC measured bf16 matmuls
at 1 GFLOP/s against 104 for fp32, and a DPO step on SmolLM2-135M ran about 20x slower than in
fp32. A CPU has bf16 hardware when /proc/cpuinfo lists `amx_bf16` or `avx512_bf16` (fp16:
`amx_fp16` or `avx512_fp16`); on CUDA the GPU decides (bf16 from Ampere on, fp16 everywhere).

What happens then is `deepspeed.precision_fallback` (align.config.DeepSpeedConfig):
`fp32` (default) trains in fp32 and says so in one line, `error` stops with a one-line config
error, `keep` runs the asked precision anyway (after the same line).

`decide` is a pure function of the cpuinfo text (tests feed it fake text); `apply_precision_policy`
reads the machine and updates a stage config in place. Imports only the standard library.
"""

from __future__ import annotations

import os
import sys
from typing import Iterable, Optional, Set, Tuple

from align.errors import ConfigError

# Flags of /proc/cpuinfo that mean the precision runs in hardware.
HARDWARE_FLAGS = {"bf16": ("amx_bf16", "avx512_bf16"), "fp16": ("amx_fp16", "avx512_fp16")}
FALLBACKS = ("fp32", "error", "keep")
CPUINFO = "/proc/cpuinfo"


def cpu_flags(cpuinfo: str) -> Set[str]:
    """The feature flags of the first processor in /proc/cpuinfo text (x86 `flags`, ARM `Features`)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def cpu_model(cpuinfo: str) -> str:
    """The processor's name in /proc/cpuinfo text ('model name'), or 'unknown CPU'."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            return value.strip()
    return "unknown CPU"


def read_cpuinfo() -> str:
    """/proc/cpuinfo, or the file named by ALIGN_CPUINFO (a test hook); '' where unreadable."""
    try:
        with open(os.environ.get("ALIGN_CPUINFO") or CPUINFO) as fh:
            return fh.read()
    except OSError:
        return ""


def hardware_precisions(cpuinfo: str) -> Tuple[str, ...]:
    """The reduced precisions ("bf16", "fp16") this CPU runs in hardware."""
    flags = cpu_flags(cpuinfo)
    return tuple(p for p, names in HARDWARE_FLAGS.items() if flags & set(names))


def decide(precision: str, fallback: str, cpuinfo: str, gpu_bf16: Optional[bool] = None,
           key: str = "deepspeed.precision") -> Tuple[str, Optional[str]]:
    """(precision to train in, one-line warning or None) for `precision` asked with `fallback`.

    `gpu_bf16` is None when training runs on CPU, else whether the GPU supports bf16 (the GPU
    decides then; /proc/cpuinfo is not read). Raises ConfigError (one line) when the hardware lacks
    the precision and `fallback` is "error". An empty `cpuinfo` (not Linux, unreadable) is trusted:
    nothing is known, so nothing is changed.
    """
    if precision not in HARDWARE_FLAGS:
        return precision, None
    if gpu_bf16 is not None:
        if precision == "fp16" or gpu_bf16:
            return precision, None
        where = "this GPU has no bf16 support"
    else:
        if not cpuinfo or precision in hardware_precisions(cpuinfo):
            return precision, None
        flags = " or ".join(HARDWARE_FLAGS[precision])
        where = f"this CPU ({cpu_model(cpuinfo)}) has no {precision} hardware (no {flags} in /proc/cpuinfo)"
    slow = f"{key}: {precision}: {where}, so {precision} would be emulated, many times slower than fp32"
    if fallback == "error":
        raise ConfigError(f"{slow}; set {key}=fp32, or "
                          f"deepspeed.precision_fallback=fp32 to fall back to fp32 on such machines")
    if fallback == "keep":
        return precision, f"warning: {slow}; running {precision} anyway (deepspeed.precision_fallback=keep)"
    return "fp32", (f"warning: {slow}; training in fp32 instead (deepspeed.precision_fallback=fp32; "
                    f"'error' stops instead)")


def _gpu_bf16(gpus_per_actor: Optional[float]) -> Optional[bool]:
    """None when the actors train on CPU, else whether this machine's GPU supports bf16."""
    if gpus_per_actor == 0 or not (os.path.exists("/proc/driver/nvidia") or os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/kfd")
                                   or os.environ.get("CUDA_VISIBLE_DEVICES")):
        return None  # no NVIDIA driver: CPU training, and no torch import needed to know it
    torch = sys.modules.get("torch")
    if torch is None:
        import torch
    if not torch.cuda.is_available():
        return None
    return bool(torch.cuda.is_bf16_supported())


_said: Set[str] = set()  # each warning once per process (a pipeline resolves every stage's config)


def apply_precision_policy(cfg, say: bool = True) -> Optional[str]:
    """Checks `cfg.deepspeed.precision` against this machine; may set it to fp32 (see `decide`).

    Prints the warning line on stderr (once per process) when `say`; returns it.
    """
    ds = getattr(cfg, "deepspeed", None)
    if ds is None or ds.precision not in HARDWARE_FLAGS:
        return None
    gpus = getattr(getattr(cfg, "ray", None), "gpus_per_actor", None)
    precision, message = decide(ds.precision, ds.precision_fallback, read_cpuinfo(), _gpu_bf16(gpus))
    ds.precision = precision
    if message and say and message not in _said:
        _said.add(message)
        print(message, file=sys.stderr, flush=True)
    return message


def describe_cpu(cpuinfo: Optional[str] = None) -> dict:
    """{"model", "bf16_flags", "hardware_precisions"}: what a benchmark records about its CPU."""
    text = read_cpuinfo() if cpuinfo is None else cpuinfo
    flags = cpu_flags(text)
    wanted: Iterable[str] = [f for names in HARDWARE_FLAGS.values() for f in names]
    return {"model": cpu_model(text), "bf16_flags": sorted(f for f in wanted if f in flags and "bf16" in f),
            "fp16_flags": sorted(f for f in wanted if f in flags and "fp16" in f),
            "hardware_precisions": list(hardware_precisions(text))}
