"""The statistics goldens hold: teacher against quantized model on paired inputs (same
observations, same noise), per DiT attention site: per-head logit Std and output RMS; plus the
action error. Works for any quantized model that keeps the model's attention sites."""

from __future__ import annotations

import torch

from quantvla.calibration.buffer import CalibrationBuffer
from quantvla.calibration.scales import observing


@torch.no_grad()
def paired_statistics(teacher, student, buffer: CalibrationBuffer) -> dict:
    stats = []
    actions = []
    for model in (teacher, student):
        with observing(model.attention_sites()) as st:
            actions.append([model.sample_actions(x, z) for x, z in zip(buffer.inputs, buffer.noise, strict=True)])
        stats.append(st)
    mse = sum(float(((a - b) ** 2).mean()) for a, b in zip(*actions, strict=True)) / len(buffer)
    energy = sum(float((a ** 2).mean()) for a in actions[0]) / len(buffer)
    # GR00T's deployment checks compare action chunks by cosine similarity (>= 0.99 for bf16 engines)
    cosines = [float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))
               for a, b in zip(*actions, strict=True)]
    scales = getattr(student, "quantvla_scales", None)
    sites = []
    for site, t, s in zip(student.attention_sites(), *stats, strict=True):
        sites.append({"name": site.name, "teacher_std": t.std.tolist(), "student_std": s.std.tolist(),
                      "teacher_rms": t.rms, "student_rms": s.rms,
                      "alpha": scales["alpha"].get(site.name) if scales else None,
                      "beta": scales["beta"].get(site.name) if scales else None})
    return {"action_mse": mse, "action_relative_mse": mse / energy if energy else 0.0,
            "action_cosine_mean": sum(cosines) / len(cosines), "action_cosine_min": min(cosines), "sites": sites}
