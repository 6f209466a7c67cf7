"""ATM and OHB: per-head logit dispersion and per-layer output energy, teacher against student,
and the clipped scalars that match them (paper Sec. 3.3, App. D).

  alpha[l, h] = Std(teacher logits) / (Std(student logits) + 1e-6)     (per DiT attention head)
  beta[l]     = RMS(teacher output) / (RMS(student output) + 1e-6)      (per DiT attention layer)
then, in log space, clipped to |log s| <= clip_log and set to 1 when |log s| < neutral_log. Both
multiply (logits <- alpha * logits through Q; output <- beta * output through W_o), the
direction every implementation uses; the paper's Eq. 12/17 print a division.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from quantvla.models.protocol import AttentionSite

EPS = 1e-6


def clip_scale(raw: torch.Tensor, clip_log: float, neutral_log: float) -> torch.Tensor:
    g = torch.log(raw.double()).clamp(-clip_log, clip_log)
    g = torch.where(g.abs() < neutral_log, torch.zeros_like(g), g)
    return torch.exp(g).float()


def fit_alpha(teacher_std: torch.Tensor, student_std: torch.Tensor, clip_log: float, neutral_log: float):
    return clip_scale(teacher_std.double() / (student_std.double() + EPS), clip_log, neutral_log)


def fit_beta(teacher_rms: torch.Tensor, student_rms: torch.Tensor, clip_log: float, neutral_log: float):
    return clip_scale(teacher_rms.double() / (student_rms.double() + EPS), clip_log, neutral_log)


class SiteStats:
    """Running means over calls: per-head logit std (valid entries only), per-layer output RMS."""

    def __init__(self, num_heads: int):
        self.std_sum = torch.zeros(num_heads, dtype=torch.float64)
        self.std_n = 0
        self.rms_sum = 0.0
        self.rms_n = 0

    def on_logits(self, logits: torch.Tensor, valid: torch.Tensor) -> None:
        m = valid.expand_as(logits).to(torch.float64)
        x = logits.double()
        n = m.sum(dim=(-1, -2)).clamp_min(1)  # [B, H]
        mean = (x * m).sum(dim=(-1, -2)) / n
        var = (((x - mean[..., None, None]) ** 2) * m).sum(dim=(-1, -2)) / n
        self.std_sum += var.sqrt().sum(0)  # per head, summed over the batch
        self.std_n += logits.shape[0]

    def on_output(self, z: torch.Tensor) -> None:
        rms = z.double().pow(2).flatten(1).mean(1).add(1e-12).sqrt()  # per sample
        self.rms_sum += float(rms.sum())
        self.rms_n += z.shape[0]

    @property
    def std(self) -> torch.Tensor:
        return self.std_sum / max(self.std_n, 1)

    @property
    def rms(self) -> float:
        return self.rms_sum / max(self.rms_n, 1)


@contextmanager
def observing(sites: list[AttentionSite]) -> Iterator[list[SiteStats]]:
    """Attach fresh SiteStats to every site for the duration of the block."""
    stats = [SiteStats(s.num_heads) for s in sites]
    for s, st in zip(sites, stats, strict=True):
        s.logit_observers.append(st.on_logits)
        s.output_observers.append(st.on_output)
    try:
        yield stats
    finally:
        for s, st in zip(sites, stats, strict=True):
            s.logit_observers.remove(st.on_logits)
            s.output_observers.remove(st.on_output)
