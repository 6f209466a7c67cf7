"""(a) Every integer backend is bit-identical to the int64 oracle."""

import subprocess
import sys
from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from quantvla.errors import KernelUnavailable
from quantvla.quant import kernels
from quantvla.quant.packing import pack_int4

from .strategies import int_matrices

HOST_BACKENDS = ["cpu"]


def needs_onednn():
    """Skip, with the library's own reason, where the prepacked oneDNN path cannot run exactly."""
    if not kernels.onednn_ok():
        pytest.skip(f"the onednn backend is unavailable on this CPU: {kernels.onednn_unavailable_reason()}")


@pytest.fixture
def onednn_available(monkeypatch):
    """Availability injected, for behaviour that does not depend on oneDNN's arithmetic (the stale
    handle check, the warning): it runs on every CPU, including those where oneDNN is inexact."""
    monkeypatch.setattr(kernels, "_onednn_why_not", "")


def _operands(draw, wbits, abits=8):
    m, k, n = draw(st.integers(1, 40)), draw(st.integers(1, 160)), draw(st.integers(1, 70))
    qx = draw(int_matrices(abits, m, k))
    qw = draw(int_matrices(wbits, n, k))
    return qx, qw


@given(data=st.data(), wbits=st.integers(2, 8), abits=st.sampled_from([4, 8]))
def test_cpu_backend_matches_oracle(data, wbits, abits):
    qx, qw = _operands(data.draw, wbits, abits)
    k = qx.shape[1]
    stored = pack_int4(qw) if wbits <= 4 else qw
    want = qx.long() @ qw.long().t()
    got = kernels.int_linear(qx, stored, k, wbits, "cpu")
    assert got.dtype == torch.int32
    assert torch.equal(got.long(), want)
    assert torch.equal(kernels.int_linear(qx, stored, k, wbits, "reference").long(), want)


@given(data=st.data(), tile_bytes=st.integers(1, 400))
def test_cpu_int4_tiling_matches_oracle(data, tile_bytes):
    """Force many row tiles through the scratch buffer (tiles of one row and up)."""
    qx, qw = _operands(data.draw, 4)
    got = kernels.cpu_int4_mm(qx, pack_int4(qw), tile_bytes=tile_bytes)
    assert torch.equal(got.long(), qx.long() @ qw.long().t())


@given(data=st.data(), wbits=st.integers(2, 8), m=st.integers(kernels.ONEDNN_MIN_M, 48),
       cache=st.booleans())
def test_onednn_backend_matches_oracle(data, wbits, m, cache):
    """Where the backend is unavailable this checks its fallback (the cpu backend). From ONEDNN_MIN_M
    rows the prepacked oneDNN kernel really runs (W5..8; W4 keeps the tile path),
    with the layer's cached handle or one built for the call; the min/max operand kinds of
    int_matrices push sums past 2^24 at large K, which must take the exact int32 fallback."""
    k, n = data.draw(st.integers(1, 160)), data.draw(st.integers(1, 70))
    qx, qw = data.draw(int_matrices(8, m, k)), data.draw(int_matrices(wbits, n, k))
    stored = pack_int4(qw) if wbits <= 4 else qw
    pk = kernels.onednn_prepack(qw) if cache and wbits > 4 else None
    got = kernels.int_linear(qx, stored, k, wbits, "onednn", pk)
    assert got.dtype == torch.int32
    assert torch.equal(got.long(), qx.long() @ qw.long().t())


@pytest.mark.parametrize("x_fill, k", [(127, 2048), (-127, 2048), (-128, 1), (-9, 16384)])
def test_onednn_sums_beyond_fp32_stay_exact(x_fill, k):
    """oneDNN hands back float(acc); past 2^24 an odd sum rounds, and the call must be redone in int32.
    One weight entry is 126 and the activations odd, so the sums are odd (they round in fp32: checked)."""
    needs_onednn()
    qx = torch.full((kernels.ONEDNN_MIN_M, k), x_fill, dtype=torch.int8)
    qw = torch.full((3, k), 127, dtype=torch.int8)
    qw[:, 0] = 126
    want = qx.long() @ qw.long().t()
    pk = kernels.onednn_prepack(qw)
    assert pk.always_exact is (128 * int(qw.long().abs().sum(1).max()) < 2**24)
    if want.abs().max() > 2**24:
        assert not torch.equal(want.float().long(), want)  # the probe really needs the fallback
    assert torch.equal(kernels.int_linear(qx, qw, k, 8, "onednn", pk).long(), want)


def test_a_stale_prepacked_weight_is_refused(onednn_available):
    qx = torch.randint(-128, 128, (32, 64), dtype=torch.int8)
    qw = torch.randint(-128, 128, (8, 64), dtype=torch.int8)
    pk = kernels.onednn_prepack(qw)
    qw[0, 0] += 1
    with pytest.raises(KernelUnavailable, match="prepack it again"):
        kernels.int_linear(qx, qw, 64, 8, "onednn", pk)


def test_onednn_prepack_bound_widens_before_abs():
    """int8 abs(-128) is -128: a bound summed in int8 would call all-min weights 'always exact'."""
    assert not kernels.onednn_prepack(torch.full((2, 2048), -128, dtype=torch.int8)).always_exact


def test_onednn_self_test_agrees_with_the_instruction_set():
    """oneDNN's u8 x s8 kernel is exact exactly where the CPU has VNNI or AMX (the cpu backend's
    GEMM is then torch._int_mm); elsewhere it saturates and the self-test must refuse it."""
    if kernels.cpu_gemm() == "int_mm":
        assert kernels.onednn_ok(), kernels.onednn_unavailable_reason()
    else:
        assert not kernels.onednn_ok()
        assert "inexact" in kernels.onednn_unavailable_reason()


def _self_test_verdict(inference_mode: bool) -> str:
    code = ("import torch\nfrom quantvla.quant import kernels\n"
            f"with torch.inference_mode({inference_mode}):\n"
            "    print(repr(kernels.onednn_unavailable_reason()))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout.strip().splitlines()[-1]


def test_onednn_self_test_run_first_under_inference_mode_agrees():
    """Eval code often runs everything under torch.inference_mode(); the one-time self-test must give
    the same verdict there (its tensors have no version counter) as outside, on every CPU."""
    assert _self_test_verdict(True) == _self_test_verdict(False)


def test_a_slow_onednn_only_warns_so_every_process_agrees(monkeypatch):
    """Speed is noisy under load; availability must not depend on it (xdist vs serial verdicts)."""
    times = iter([1.0, 0.0001])  # oneDNN's reference kernel, then _int_mm
    monkeypatch.setattr(kernels, "_best_of", lambda fn: next(times))
    monkeypatch.setattr(kernels, "_onednn_why_not", None)
    monkeypatch.setattr(kernels, "_onednn_self_test", lambda: "")  # exact here, whatever the CPU
    with pytest.warns(RuntimeWarning, match="slow reference int8 kernel"):
        assert kernels.onednn_ok()


def test_onednn_unavailable_falls_back_to_cpu_once_with_a_reason(monkeypatch):
    monkeypatch.setattr(kernels, "_onednn_why_not", "no oneDNN here (test)")
    monkeypatch.setattr(kernels, "_onednn_warned", False)
    qx = torch.randint(-128, 128, (32, 64), dtype=torch.int8)
    qw = torch.randint(-128, 128, (8, 64), dtype=torch.int8)
    with pytest.warns(RuntimeWarning, match=r"'onednn' is unavailable \(no oneDNN here \(test\)\); using 'cpu'"):
        got = kernels.int_linear(qx, qw, 64, 8, "onednn")
    assert torch.equal(got.long(), qx.long() @ qw.long().t())
    assert kernels.resolve_backend("onednn", qx.device) == "cpu"  # no second warning needed


def test_cpu_self_test_passes_on_this_machine():
    assert kernels.cpu_kernel_ok(), f"the {kernels.cpu_gemm()} GEMM is inexact here; the cpu backend would fall back"


def _skip_without(gemm: str) -> None:
    if gemm == "u8_weight" and not kernels._has_onednn_qlinear():
        pytest.skip("the u8_weight GEMM needs oneDNN's quantized linear, which this torch build lacks")


@pytest.mark.parametrize("gemm", kernels.CPU_GEMMS)
@given(data=st.data(), wbits=st.integers(2, 8), abits=st.sampled_from([4, 8]))
def test_every_cpu_gemm_matches_oracle(gemm, data, wbits, abits):
    """Each GEMM the cpu backend can choose is exact on this machine too, not only the one chosen;
    u8_weight on every drawn shape, not only those it is fast on (it is exact on VNNI CPUs too)."""
    _skip_without(gemm)
    qx, qw = _operands(data.draw, wbits, abits)
    stored = pack_int4(qw) if wbits <= 4 else qw
    with mock.patch.object(kernels, "_cpu_gemm", gemm), mock.patch.object(kernels, "_u8_weight_worth", lambda *a: True):
        got = kernels.int_linear(qx, stored, qx.shape[1], wbits, "cpu")
    assert got.is_contiguous() and got.dtype == torch.int32
    assert torch.equal(got.long(), qx.long() @ qw.long().t())


@pytest.mark.parametrize("gemm", kernels.CPU_GEMMS)
@pytest.mark.parametrize("wbits, k", [(8, 1024), (8, 3000), (8, 16384), (4, 16384), (4, 40000)])
def test_fp32_chunks_stop_at_the_exactness_edge(monkeypatch, gemm, wbits, k):
    """All-min operands make every partial sum as large as it can be (one fp32 chunk of K = 1024 at
    W8, 16384 at W4, sums to just under 2^24); the first product is odd, so every sum is odd and
    past 2^24 fp32 rounds it (checked below): a chunk one column too long fails here. The u8_weight
    GEMM's fp32 results reach 8 * 128 * K, 2^24 at K = 16384, its longest K."""
    _skip_without(gemm)
    monkeypatch.setattr(kernels, "_cpu_gemm", gemm)
    monkeypatch.setattr(kernels, "_u8_weight_worth", lambda *a: True)
    lo = -(1 << (wbits - 1))
    qx = torch.full((3, k), -128, dtype=torch.int8)
    qw = torch.full((2, k), lo, dtype=torch.int8)
    qx[:, 0], qw[:, 0] = -127, lo + 1  # an odd first product
    want = qx.long() @ qw.long().t()
    if k > kernels.fp32_chunk(-lo):
        assert not torch.equal(torch.tensor(want.numpy().astype("float32")).long(), want)
    stored = pack_int4(qw) if wbits <= 4 else qw
    assert torch.equal(kernels.int_linear(qx, stored, k, wbits, "cpu").long(), want)


def test_the_cpu_gemm_can_be_chosen_by_hand_and_detected_again():
    detected = kernels.cpu_gemm()
    other = "fp32" if detected == "int_mm" else "int_mm"
    try:
        kernels.set_cpu_gemm(other)
        assert kernels.cpu_gemm() == other and kernels.cpu_kernel_ok()  # the self-test reran for it
        with pytest.raises(KernelUnavailable, match="unknown cpu GEMM"):
            kernels.set_cpu_gemm("avx9")
    finally:
        kernels.set_cpu_gemm(None)
    assert kernels.cpu_gemm() == detected


def test_an_inexact_u8_weight_gemm_hands_over_to_fp32(monkeypatch):
    """Known-bad: a u8_weight GEMM off by one (e.g. a wrong zero point) fails its self-test; the cpu
    backend warns once and multiplies on the fp32 GEMM, which is exact, instead of the slow oracle."""
    _skip_without("u8_weight")
    monkeypatch.setattr(kernels, "_u8_weight_mm", lambda a, b: kernels._reference(a, b) + 1)
    try:
        kernels.set_cpu_gemm("u8_weight")
        with pytest.warns(RuntimeWarning, match="uses its fp32 GEMM instead$"):
            assert kernels.cpu_kernel_ok()
        assert kernels.cpu_gemm() == "fp32"
        gen = torch.Generator().manual_seed(0)
        qx = torch.randint(-128, 128, (64, 2048), generator=gen, dtype=torch.int8)
        qw = torch.randint(-128, 128, (2048, 2048), generator=gen, dtype=torch.int8)
        assert torch.equal(kernels.int_linear(qx, qw, 2048, 8, "cpu").long(), qx.long() @ qw.long().t())
    finally:
        kernels.set_cpu_gemm(None)


def test_cpu_gemm_follows_the_instruction_set():
    """Read /proc/cpuinfo independently of torch's detection (Linux only)."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        pytest.skip("no /proc/cpuinfo flags line on this platform (not x86 Linux)")
    vnni = {"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags)
    without = "u8_weight" if kernels._has_onednn_qlinear() else "fp32"
    assert kernels.cpu_kernel_ok()  # and its self-test did not hand over to another GEMM
    assert kernels.cpu_gemm() == ("int_mm" if vnni else without), flags


def test_saturating_operands_at_large_k():
    k = 16384
    qx = torch.full((3, k), -128, dtype=torch.int8)
    qw = torch.full((5, k), -128, dtype=torch.int8)
    assert torch.equal(kernels.int_linear(qx, qw, k, 8, "cpu").long(), qx.long() @ qw.long().t())


def test_backend_errors_are_clear():
    qx = torch.zeros(2, 4, dtype=torch.int8)
    with pytest.raises(KernelUnavailable, match="unknown integer backend"):
        kernels.int_linear(qx, qx, 4, 8, "tpu")
    with pytest.raises(KernelUnavailable, match="needs CUDA tensors"):
        kernels.int_linear(qx, qx, 4, 8, "cuda")
    if torch.cuda.is_available():
        with pytest.raises(KernelUnavailable, match="'onednn' needs CPU tensors"):
            kernels.int_linear(qx.cuda(), qx.cuda(), 4, 8, "onednn")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@given(data=st.data(), wbits=st.sampled_from([4, 8]))
def test_cuda_backend_matches_oracle(data, wbits):
    qx, qw = _operands(data.draw, wbits)
    stored = pack_int4(qw) if wbits <= 4 else qw
    got = kernels.int_linear(qx.cuda(), stored.cuda(), qx.shape[1], wbits, "cuda").cpu()
    assert torch.equal(got.long(), qx.long() @ qw.long().t())
