"""align.precision.decide: bf16 / fp16 asked on hardware without them, from fake /proc/cpuinfo text."""

import pytest

from align.config import ConfigError, DeepSpeedConfig
from align.precision import cpu_flags, cpu_model, decide, describe_cpu, hardware_precisions


def cpuinfo(model: str, flags: str) -> str:
    """Two processors, as /proc/cpuinfo lists them (the first one's flags count)."""
    one = f"processor\t: 0\nvendor_id\t: X\nmodel name\t: {model}\nflags\t\t: {flags}\n"
    return one + "\n" + one.replace("processor\t: 0", "processor\t: 1") + "\n"


AVX2 = cpuinfo("AMD EPYC 7B13", "fpu sse sse2 avx avx2 fma")
AVX512 = cpuinfo("Intel Xeon Platinum 8272CL", "avx2 avx512f avx512bw avx512_vnni")
SAPPHIRE = cpuinfo("Intel Xeon Platinum 8481C", "avx2 avx512f avx512_bf16 avx512_fp16 amx_bf16 amx_tile")
COOPER = cpuinfo("Intel Xeon Platinum 8380H", "avx2 avx512f avx512_bf16")


def test_cpuinfo_parsing():
    assert cpu_model(AVX2) == "AMD EPYC 7B13"
    assert cpu_flags(SAPPHIRE) == {"avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile"}
    assert cpu_model("") == "unknown CPU" and cpu_flags("") == set()
    assert hardware_precisions(AVX2) == () and hardware_precisions(AVX512) == ()
    assert hardware_precisions(COOPER) == ("bf16",)
    assert hardware_precisions(SAPPHIRE) == ("bf16", "fp16")
    assert describe_cpu(SAPPHIRE) == {"model": "Intel Xeon Platinum 8481C", "bf16_flags": ["amx_bf16", "avx512_bf16"],
                                      "fp16_flags": ["avx512_fp16"], "hardware_precisions": ["bf16", "fp16"]}


@pytest.mark.parametrize("text", [AVX2, AVX512, COOPER, SAPPHIRE, ""])
@pytest.mark.parametrize("fallback", ["fp32", "error", "keep"])
def test_fp32_is_never_touched(text, fallback):
    assert decide("fp32", fallback, text) == ("fp32", None)


@pytest.mark.parametrize("text", [SAPPHIRE, COOPER])
def test_bf16_hardware_keeps_bf16_silently(text):
    for fallback in ("fp32", "error", "keep"):
        assert decide("bf16", fallback, text) == ("bf16", None)


def test_no_bf16_hardware_falls_back_to_fp32_in_one_line():
    precision, line = decide("bf16", "fp32", AVX2)
    assert precision == "fp32"
    assert line == ("warning: deepspeed.precision: bf16: this CPU (AMD EPYC 7B13) has no bf16 hardware "
                    "(no amx_bf16 or avx512_bf16 in /proc/cpuinfo), so bf16 would be emulated, many times slower "
                    "than fp32; training in fp32 instead (deepspeed.precision_fallback=fp32; 'error' stops instead)")
    assert "\n" not in line


def test_no_bf16_hardware_error_names_the_keys():
    with pytest.raises(ConfigError) as err:
        decide("bf16", "error", AVX512)
    text = str(err.value)
    assert text.startswith("deepspeed.precision: bf16: this CPU (Intel Xeon Platinum 8272CL) has no bf16 hardware")
    assert "deepspeed.precision=fp32" in text and "deepspeed.precision_fallback=fp32" in text
    assert "\n" not in text


def test_keep_runs_bf16_but_says_so():
    precision, line = decide("bf16", "keep", AVX2)
    assert precision == "bf16" and line.startswith("warning: ") and line.endswith("running bf16 anyway "
                                                                                   "(deepspeed.precision_fallback=keep)")


def test_fp16_needs_fp16_flags():
    assert decide("fp16", "fp32", SAPPHIRE) == ("fp16", None)
    assert decide("fp16", "fp32", COOPER)[0] == "fp32"  # bf16 hardware is not fp16 hardware
    assert "no amx_fp16 or avx512_fp16" in decide("fp16", "fp32", COOPER)[1]


def test_unreadable_cpuinfo_changes_nothing():
    assert decide("bf16", "error", "") == ("bf16", None)


def test_on_gpu_the_gpu_decides():
    assert decide("bf16", "error", AVX2, gpu_bf16=True) == ("bf16", None)  # the host CPU does not matter
    assert decide("fp16", "error", AVX2, gpu_bf16=False) == ("fp16", None)
    precision, line = decide("bf16", "fp32", SAPPHIRE, gpu_bf16=False)
    assert precision == "fp32" and "this GPU has no bf16 support" in line


def test_config_key_is_checked():
    assert DeepSpeedConfig().precision_fallback == "fp32"
    with pytest.raises(ConfigError, match=r"deepspeed.precision_fallback: 'maybe' is not one of \['fp32', 'error', 'keep'\]"):
        DeepSpeedConfig(precision="bf16", precision_fallback="maybe")
