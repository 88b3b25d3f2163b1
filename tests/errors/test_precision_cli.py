"""bf16 asked on a CPU without bf16 hardware: one line before Ray starts (a fake /proc/cpuinfo,
ALIGN_CPUINFO, makes the CPU an AVX2-only one on every machine)."""

from tests.errors.helpers import pair_rows, stage_config, write_jsonl

AVX2 = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse2 avx avx2 fma\n"
WARNING = ("warning: deepspeed.precision: bf16: this CPU (AMD EPYC 7B13) has no bf16 hardware (no amx_bf16 or "
           "avx512_bf16 in /proc/cpuinfo), so bf16 would be emulated, many times slower than fp32; training in fp32 "
           "instead (deepspeed.precision_fallback=fp32; 'error' stops instead)")


def test_error_is_one_line_before_ray(cli, tmp_path):
    (tmp_path / "cpuinfo").write_text(AVX2)
    cfg = stage_config(tmp_path, write_jsonl(tmp_path / "d.jsonl", pair_rows(8)),
                       deepspeed={"precision": "bf16", "precision_fallback": "error"})
    r = cli("align-run", "dpo", "--config", cfg, env={"ALIGN_CPUINFO": str(tmp_path / "cpuinfo")})
    assert r.rc == 2
    assert r.lines == ["error: deepspeed.precision: bf16: this CPU (AMD EPYC 7B13) has no bf16 hardware (no amx_bf16 "
                       "or avx512_bf16 in /proc/cpuinfo), so bf16 would be emulated, many times slower than fp32; "
                       "set deepspeed.precision=fp32, or deepspeed.precision_fallback=fp32 to fall back to fp32 on "
                       "such machines"]
    assert not (tmp_path / "run").exists()  # nothing started


def test_fallback_warns_first(cli, tmp_path):
    """The default (fp32 fallback) prints its line before the data checks: a bad row after it
    still stops the command before Ray, so this costs no start-up."""
    (tmp_path / "cpuinfo").write_text(AVX2)
    rows = pair_rows(8)
    rows[3]["rejected"] = rows[3]["chosen"]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = stage_config(tmp_path, data, deepspeed={"precision": "bf16"})
    r = cli("align-run", "dpo", "--config", cfg, env={"ALIGN_CPUINFO": str(tmp_path / "cpuinfo")})
    assert r.rc == 2
    assert r.lines == [WARNING, f"error: {data}: row 3, field 'rejected': identical to 'chosen' (rows are numbered "
                                "from 0)"]
