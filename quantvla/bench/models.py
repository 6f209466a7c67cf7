"""FP against quantized, per model: action-chunk latency, quantization (calibration) time and the
memory of the quantized components, measured side by side in one run.

Each model is quantized once, timed (that is the calibration time: activation recording, DuQuant
fitting, integer packing, ATM/OHB fitting). Then the FP and the quantized model produce the same
action chunk (same inputs, same noise) in interleaved rounds, FP, quantized, FP, ..., and each keeps
its median, so a burst of load from another process hits both alike. speedup = FP time / quantized
time (> 1: the quantized model is faster). Memory follows quantvla.memory: FP16 bytes of the
components against the storage and resident bytes of what replaced them.

Sizes: `trained` (the shipped policies, calibrated on their recorded observations), `tiny` (random
weights, synthetic buffer) and `full` (random weights at the real sizes; a 1-entry buffer, because
calibration quality does not change speed or bytes).
"""

from __future__ import annotations

import itertools
import os
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from quantvla.memory import GIB

MIB = 2**20


@dataclass
class ModelRow:
    model: str
    size: str
    device: str
    fp_dtype: str
    quantizer: str
    params_M: float
    steps: int
    horizon: int
    calib_entries: int
    fp_chunk_ms: float
    q_chunk_ms: float
    speedup: float
    quantize_s: float
    fp16_mib: float
    storage_mib: float
    resident_mib: float
    saving: float
    ops_per_linear: int | None = None  # top-level torch ops one quantized linear call dispatches
    fp_peak_mib: float | None = None  # CUDA only: peak allocated memory while the model runs a chunk
    q_peak_mib: float | None = None
    fp_model_mib: float | None = None  # bytes of every FP parameter and buffer, in the model's dtype
    quantize_peak_rss_mib: float | None = None  # CPU, Linux: the process's peak RSS while quantize() ran
    quantize_peak_cuda_mib: float | None = None  # CUDA: peak allocated memory while quantize() ran
    # CPU: the same quantized model on the fused forward (quant/fused.py), in the same rounds; None
    # where the extension is unavailable (fused_unavailable says why)
    q_fused_chunk_ms: float | None = None
    fused_speedup: float | None = None
    fused_identical: bool | None = None  # the fused chunk equals the eager one, bit for bit
    fused_unavailable: str | None = None
    layers_per_pass: int | None = None  # quantize()'s streaming group (None: every layer in one pass)


class PeakRSS:
    """The process's peak resident set size over a block, sampled every `interval` s from
    /proc/self/statm by a thread (None where there is no /proc). ru_maxrss cannot be reset, so a
    block later in a run would report an earlier, larger peak."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak_bytes = interval, None
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self._stop = threading.Event()

    def _rss(self) -> int | None:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self._page
        except OSError:
            return None

    def _watch(self) -> None:
        while not self._stop.is_set():
            rss = self._rss()
            if rss is not None:
                self.peak_bytes = max(self.peak_bytes or 0, rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        rss = self._rss()
        if rss is not None:
            self.peak_bytes = max(self.peak_bytes or 0, rss)


def _subject(family: str, size: str, seed: int, entries: int):
    """(FP model, calibration buffer, the inputs and noise one timed chunk uses)."""
    from quantvla import families

    if not families.is_trained(size):
        torch.manual_seed(seed)
    loaded = families.load_fp(family, size, entries=entries, seed=seed)
    buffer = loaded.calibration
    return loaded.model, buffer, buffer.inputs[0], buffer.noise[0]


def _size(nbytes: int) -> str:
    return f"{nbytes / GIB:.3f} GiB" if nbytes >= GIB / 10 else f"{nbytes / MIB:.3f} MiB"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def ops_per_linear_call(q: torch.nn.Module, x, noise) -> int | None:
    """Top-level torch operators one call of the first quantized linear dispatches, on the input it
    sees in a real chunk (profiled alone, so nested and model ops are not counted). On these small
    models each operator costs about as much as the arithmetic, so this is the latency to cut."""
    from torch.profiler import ProfilerActivity, profile

    from quantvla.quant.linear import QuantLinear

    layer = next((m for m in q.modules() if isinstance(m, QuantLinear)), None)
    if layer is None:
        return None
    seen = []
    hook = layer.register_forward_pre_hook(lambda _mod, args: seen.append(args[0]) if not seen else None)
    try:
        with torch.no_grad():
            q.sample_actions(x, noise)
    finally:
        hook.remove()
    with torch.no_grad():
        layer(seen[0])  # first call builds the layer's caches
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            layer(seen[0])
    return sum(1 for e in prof.events() if e.name.startswith("aten::") and (
        e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))


def measure(family: str, size: str = "tiny", quantizer: str = "quantvla-w4a8", rounds: int = 15, seed: int = 0,
            entries: int = 16, device: str = "cpu", fp_dtype: torch.dtype = torch.float32, log=print,
            layers_per_pass: int | None = None) -> ModelRow:
    from quantvla import quantize
    from quantvla.memory import component_memory

    model, buffer, x, noise = _subject(family, size, seed, entries)
    model = model.to(device=device, dtype=fp_dtype).eval()
    buffer, x, noise = buffer.to(device), x.to(device), noise.to(device)
    _sync(device)
    fp_bytes = sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers()))
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with PeakRSS() as rss:
        q = quantize(model, buffer, quantizer, layers_per_pass=layers_per_pass).eval()
        _sync(device)
    quantize_s = time.perf_counter() - t0
    quantize_cuda = round(torch.cuda.max_memory_allocated() / MIB, 1) if device.startswith("cuda") else None
    quantize_rss = None if rss.peak_bytes is None else round(rss.peak_bytes / MIB, 1)
    ops = ops_per_linear_call(q, x, noise)

    def chunk(m):
        with torch.no_grad():
            m.sample_actions(x, noise)
        _sync(device)

    peaks = {}
    if device.startswith("cuda"):  # device memory really allocated by each model while it runs
        for key, m in (("fp", model), ("q", q)):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            chunk(m)
            peaks[key] = round(torch.cuda.max_memory_allocated() / MIB, 1)
    from quantvla.quant import fused

    fused_why = None if device == "cpu" and fused.available() else (
        fused.unavailable_reason() or f"the fused forward runs on the CPU only, not {device}")
    runs = [("fp", model, "eager"), ("q", q, "eager")] + ([] if fused_why else [("q_fused", q, "fused")])
    times: dict[str, list[float]] = {key: [] for key, _, _ in runs}
    identical = None
    if not fused_why:  # warm-up too: first-call allocations and kernel selection
        with torch.no_grad():
            eager_chunk = q.sample_actions(x, noise)
            with fused.forward_override("fused"):
                identical = bool(torch.equal(eager_chunk, q.sample_actions(x, noise)))
    for _, m, forward in runs:
        with fused.forward_override(forward):
            chunk(m)
    for _ in range(rounds):
        for key, m, forward in runs:
            with fused.forward_override(forward):
                t0 = time.perf_counter()
                chunk(m)
                times[key].append(time.perf_counter() - t0)
    fp_ms, q_ms = (statistics.median(times[k]) * 1e3 for k in ("fp", "q"))
    fused_ms = statistics.median(times["q_fused"]) * 1e3 if "q_fused" in times else None
    mem = component_memory(model, q)  # after the runs: the caches built on first use count as resident
    c = model.config
    row = ModelRow(family, size, device, str(fp_dtype).removeprefix("torch."), quantizer,
                   round(sum(p.numel() for p in model.parameters()) / 1e6, 3), c.num_steps, c.action_horizon,
                   len(buffer), round(fp_ms, 3), round(q_ms, 3), round(fp_ms / q_ms, 2), round(quantize_s, 2),
                   round(mem.fp16_bytes / MIB, 3), round(mem.storage_bytes / MIB, 3),
                   round(mem.resident_bytes / MIB, 3), round(mem.saving, 4), ops, peaks.get("fp"), peaks.get("q"),
                   round(fp_bytes / MIB, 1), quantize_rss, quantize_cuda,
                   None if fused_ms is None else round(fused_ms, 3),
                   None if fused_ms is None else round(fp_ms / fused_ms, 2), identical, fused_why, layers_per_pass)
    log(f"  {family} {size} ({row.params_M} M params, {row.fp_dtype} on {device}): chunk FP {fp_ms:.1f} ms, "
        f"{quantizer} {q_ms:.1f} ms ({row.speedup}x); quantize {quantize_s:.1f} s on {len(buffer)} entries"
        + (f" ({layers_per_pass} layers per pass)" if layers_per_pass else "")
        + (f", peak RSS {_size(rss.peak_bytes)} = {rss.peak_bytes / fp_bytes:.2f}x the FP model's {_size(fp_bytes)}"
           if rss.peak_bytes else "") + "; "
        f"components FP16 {_size(mem.fp16_bytes)} -> {_size(mem.storage_bytes)} stored, "
        f"{_size(mem.resident_bytes)} resident ({mem.saving:.1%} saved); {ops} ops per quantized linear call"
        + (f"; peak CUDA memory FP {peaks['fp']} MiB, quantized {peaks['q']} MiB" if peaks else "")
        + (f"; fused forward {fused_ms:.1f} ms ({row.fused_speedup}x FP), bit-identical to eager: {identical}"
           if fused_ms is not None else f"; fused forward unavailable ({fused_why})"))
    return row


def run(families=None, size: str = "tiny", quantizer: str = "quantvla-w4a8", rounds: int = 15,
        seed: int = 0, entries: int = 16, device: str = "cpu", fp_dtype: torch.dtype = torch.float32,
        log=print, layers_per_pass: int | None = None) -> list[ModelRow]:
    """One row per family (default: every registered one)."""
    from quantvla import families as registry

    return [measure(f, size, quantizer, rounds, seed, entries, device, fp_dtype, log, layers_per_pass)
            for f in families or registry.names()]


def as_dicts(rows: list[ModelRow]) -> list[dict]:
    return [asdict(r) for r in rows]


def plot(rows: list[ModelRow], path: str | Path) -> bool:
    """PNG: chunk latency FP vs quantized, and component memory FP16 vs stored vs resident."""
    from quantvla.bench.plot import grouped_bars

    labels = [f"{r.model} {r.size}" for r in rows]
    return grouped_bars(path, labels, [
        ("action chunk (ms)", {"FP " + (rows[0].fp_dtype if rows else ""): [r.fp_chunk_ms for r in rows],
                               "quantized": [r.q_chunk_ms for r in rows],
                               "quantized, fused forward": [r.q_fused_chunk_ms or 0.0 for r in rows]}),
        ("quantized components (MiB)", {"FP16": [r.fp16_mib for r in rows], "stored": [r.storage_mib for r in rows],
                                        "resident": [r.resident_mib for r in rows]}),
    ], title=f"{rows[0].quantizer if rows else ''}: FP vs quantized, one run")
