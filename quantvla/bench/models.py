"""Action-chunk latency of the model zoo on this machine (median of interleaved rounds)."""

from __future__ import annotations

import statistics
import time

import torch

from quantvla.models import build


def run(families=("pi05", "gr00t-n15"), size: str = "tiny", rounds: int = 15, seed: int = 0, log=print) -> list[dict]:
    models = {}
    for fam in families:
        torch.manual_seed(seed)
        m = build(fam, size)
        models[fam] = (m, m.example_inputs(seed=seed))
    times = {fam: [] for fam in families}
    for m, x in models.values():  # warm-up
        m.sample_actions(x, generator=torch.Generator().manual_seed(seed))
    for _ in range(rounds):
        for fam, (m, x) in models.items():
            t0 = time.perf_counter()
            m.sample_actions(x, generator=torch.Generator().manual_seed(seed))
            times[fam].append(time.perf_counter() - t0)
    rows = []
    for fam, (m, _) in models.items():
        from quantvla import CalibrationBuffer, quantize
        buf = CalibrationBuffer.synthetic(m, 16, seed=seed)
        t0 = time.perf_counter()
        quantize(m, buf, "quantvla-w4a8")
        calib_s = time.perf_counter() - t0
        c = m.config
        rows.append({"model": fam, "size": size, "steps": c.num_steps, "horizon": c.action_horizon,
                     "params_M": round(sum(p.numel() for p in m.parameters()) / 1e6, 3),
                     "chunk_ms": round(statistics.median(times[fam]) * 1e3, 3),
                     "quantize_w4a8_s": round(calib_s, 2)})
        log(f"  {fam} {size}: one action chunk ({c.num_steps} steps, horizon {c.action_horizon}) "
            f"{rows[-1]['chunk_ms']:.1f} ms; quantize quantvla-w4a8 on a 16-entry buffer {calib_s:.1f} s")
    return rows
