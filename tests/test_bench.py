"""The benchmarks: ratios come from one run, memory follows the accounting rule, JSON + PNG."""

import json
import subprocess
import sys

import pytest
import torch

from quantvla.bench import kernels


@pytest.mark.slow  # a whole bench run: two models quantized and timed
def test_bench_models_cli_writes_rows_json_and_png(tmp_path):
    out = tmp_path / "models.json"
    run = subprocess.run([sys.executable, "-m", "quantvla", "bench", "models", "--model", "pi05", "--size", "tiny",
                          "--rounds", "2", "--entries", "2", "--json", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["command"].startswith("python -m quantvla bench models")
    (row,) = data["rows"]
    assert row["model"] == "pi05" and row["quantizer"] == "quantvla-w4a8" and row["calib_entries"] == 2
    assert row["speedup"] == pytest.approx(row["fp_chunk_ms"] / row["q_chunk_ms"], abs=0.01)
    # W4 storage of the LLM + DiT MLP linears; DiT attention stays FP16 in the count
    assert row["storage_mib"] < 0.75 * row["fp16_mib"] and row["saving"] > 0.25
    # the reference layer's only cache is its rotations' reflection plan: a few bytes per block
    assert row["storage_mib"] <= row["resident_mib"] <= row["storage_mib"] + 0.002
    # the lean forward: 205 top-level torch ops per call before it, about 40 after
    assert 0 < row["ops_per_linear"] <= 80
    assert row["fp_peak_mib"] is None and row["quantize_peak_cuda_mib"] is None  # CUDA only
    # the quantize() peak is the whole process's RSS: at least the FP model it holds
    assert row["fp_model_mib"] > 0 and row["quantize_peak_rss_mib"] > row["fp_model_mib"]
    png = out.with_suffix(".png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_kernels_rows_are_ratios_of_the_same_run(tmp_path):
    rows = kernels.run(ms=(8,), kns=((128, 96),), with_transform=True, min_rounds=2, min_seconds=0.0,
                       log=lambda _: None)
    by_name = {r.name: r for r in rows}
    from quantvla.quant.kernels import cpu_gemm
    # where the cpu backend runs the u8_weight GEMM, the fp32 GEMM it replaced is timed beside it
    old_route = {"W8A8 fp32-GEMM", "W4A8 fp32-GEMM"} if cpu_gemm() == "u8_weight" else set()
    bf16_calls = {"W4A8+DuQuant bf16 in/out", "W4A8+DuQuant bf16 via fp32"}  # a bf16 model's call, two routes
    assert set(by_name) == {"fp32 F.linear", "bf16 F.linear", "W8A8", "W8A8 prepacked", "W4A8", "W4A4",
                            "W4A8+DuQuant"} | old_route | bf16_calls
    for name in old_route | bf16_calls:  # the same layer on another route: the same bytes resident
        assert by_name[name].resident_bytes == by_name[name.split()[0]].resident_bytes
    fp32 = by_name["fp32 F.linear"].ms
    for r in rows:
        assert r.vs_fp32 == pytest.approx(fp32 / r.ms, rel=0.02, abs=0.01)
    # memory beside speed: W4 stays packed (no cache), the prepacked W8 pays for its oneDNN copy
    assert by_name["W4A8"].resident_bytes < 0.3 * by_name["bf16 F.linear"].resident_bytes
    # (where oneDNN is inexact the backend runs 'cpu' instead, and nothing is cached)
    from quantvla.quant.kernels import onednn_ok
    if onednn_ok():
        assert by_name["W8A8 prepacked"].resident_bytes > 1.9 * by_name["W8A8"].resident_bytes
    else:
        assert by_name["W8A8 prepacked"].resident_bytes == by_name["W8A8"].resident_bytes
    assert kernels.plot(rows, tmp_path / "k.png")
    assert (tmp_path / "k.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args, message", [
    (["models", "--quantizer", "nope"], "unknown quantizer preset 'nope'"),
    (["models", "--device", "tpu"], "choose cpu or cuda"),
    pytest.param(["kernels", "--device", "cuda"], "no CUDA device", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="this machine has CUDA: the message is for machines without it")),
])
def test_bench_bad_input_is_one_clear_line(args, message):
    run = subprocess.run([sys.executable, "-m", "quantvla", "bench", *args], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2
    assert message in run.stderr and "Traceback" not in run.stderr
