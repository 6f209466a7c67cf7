"""Configuration of one quantized linear layer, as frozen dataclasses.

Every knob that changes numbers is a field here, so a config written to JSON
describes a quantized layer completely. Nothing is read from the environment.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from quantvla.errors import QuantInputError

MIN_BITS, MAX_BITS = 2, 8

# Clipping ratios tried by the per-row MSE search for weight scales: 1.0 (no clipping)
# down to 0.5 of the row's absolute maximum.
DEFAULT_CLIP_RATIOS = tuple(round(1.0 - 0.025 * i, 3) for i in range(21))


def check_bits(bits: int, what: str) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not MIN_BITS <= bits <= MAX_BITS:
        raise QuantInputError(
            f"{what} bits must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r}; "
            "use 4 or 8 for the paper's settings"
        )


@dataclass(frozen=True)
class WeightQuantConfig:
    """Symmetric, signed, per-output-channel weight grid [-2^(b-1), 2^(b-1)-1].

    rounding "nearest": each weight to its nearest grid point (the paper's RTN, App. A).
    rounding "gptq": the same grid and scales, but the columns are rounded one after another and
    each rounding error is pushed onto the columns not yet rounded, weighted by the calibration
    activations' second moments (GPTQ, Frantar et al. 2023); it needs calibration activations.
    gptq_damp: ridge added to that matrix, as a fraction of its mean diagonal.
    """

    bits: int = 4
    clip_ratios: tuple[float, ...] = DEFAULT_CLIP_RATIOS  # (1.0,) turns the MSE search off
    rounding: Literal["nearest", "gptq"] = "nearest"
    gptq_damp: float = 0.1  # 0.01 (GPTQ's default) fits a 16-entry buffer too closely: docs/quantizer.md

    def __post_init__(self) -> None:
        check_bits(self.bits, "weight")
        if self.rounding not in ("nearest", "gptq"):
            raise QuantInputError(f"weight rounding must be 'nearest' or 'gptq', got {self.rounding!r}")
        if not 0.0 < self.gptq_damp <= 1.0:
            raise QuantInputError(f"gptq_damp must be in (0, 1], got {self.gptq_damp!r}")
        if not self.clip_ratios or any(not 0.0 < r <= 1.0 for r in self.clip_ratios):
            raise QuantInputError(f"clip_ratios must be non-empty values in (0, 1], got {self.clip_ratios!r}")
        object.__setattr__(self, "clip_ratios", tuple(float(r) for r in self.clip_ratios))


@dataclass(frozen=True)
class ActQuantConfig:
    """Activation grid.

    granularity "per_token": dynamic, one scale per row, computed at run time (paper App. A).
    granularity "per_tensor": static, one scale for the layer, calibrated as the given
    percentile of the calibration activations (the rest is clipped).
    symmetric=False is the paper's unsigned grid with a zero point.
    """

    bits: int = 8
    granularity: Literal["per_token", "per_tensor"] = "per_token"
    symmetric: bool = False
    percentile: float = 99.9

    def __post_init__(self) -> None:
        check_bits(self.bits, "activation")
        if self.granularity not in ("per_token", "per_tensor"):
            raise QuantInputError(
                f"activation granularity must be 'per_token' or 'per_tensor', got {self.granularity!r} "
                "(a per-input-channel scale cannot be factored out of an integer GEMM: use smoothing instead)"
            )
        if not 50.0 < self.percentile <= 100.0:
            raise QuantInputError(f"activation percentile must be in (50, 100], got {self.percentile!r}")


@dataclass(frozen=True)
class DuQuantConfig:
    """The outlier-taming transform of paper App. B.

    rotation "greedy": original DuQuant, block-orthogonal rotations chosen greedily from the
    activation outliers (stored as a few indices per block), zigzag permutation, second rotation.
    rotation "svd": the QuantVLA authors' variant, rotations from the SVD of weight blocks, a
    weight-energy permutation and, with restore_output, an output-side rotation undone after
    the GEMM.
    smooth_strength: SmoothQuant exponent for the per-channel smoothing (0 turns it off).
    """

    block_size: int = 64
    smooth_strength: float = 0.15
    rotation: Literal["greedy", "svd"] = "greedy"
    rotation_steps: int = 8  # greedy steps per block; the best prefix is kept
    permute: bool = True
    restore_output: bool = True  # svd variant only

    def __post_init__(self) -> None:
        if self.block_size < 2:
            raise QuantInputError(f"DuQuant block_size must be >= 2, got {self.block_size}")
        if self.rotation not in ("greedy", "svd"):
            raise QuantInputError(f"DuQuant rotation must be 'greedy' or 'svd', got {self.rotation!r}")
        if not 0.0 <= self.smooth_strength <= 1.0:
            raise QuantInputError(f"smooth_strength must be in [0, 1], got {self.smooth_strength}")
        if self.rotation_steps < 0:
            raise QuantInputError(f"rotation_steps must be >= 0, got {self.rotation_steps}")


@dataclass(frozen=True)
class LinearQuantConfig:
    """Everything needed to turn one nn.Linear into a QuantLinear."""

    weight: WeightQuantConfig = field(default_factory=WeightQuantConfig)
    act: ActQuantConfig = field(default_factory=ActQuantConfig)
    transform: DuQuantConfig | None = None
    backend: str = "auto"  # "auto" | "reference" | "cpu" | "onednn" (CPU, W8 prepacked cache) | "cuda"

    @property
    def tag(self) -> str:
        return f"w{self.weight.bits}a{self.act.bits}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LinearQuantConfig:
        d = dict(d)
        w = WeightQuantConfig(**{**d.pop("weight", {}), })
        a = ActQuantConfig(**d.pop("act", {}))
        t = d.pop("transform", None)
        return cls(weight=w, act=a, transform=DuQuantConfig(**t) if t else None, **d)


def linear_config(bits: str = "w4a8", transform: DuQuantConfig | None = None, backend: str = "auto",
                  **act: Any) -> LinearQuantConfig:
    """Shorthand: linear_config("w4a8") -> 4-bit weights, 8-bit per-token asymmetric activations."""
    try:
        wb, ab = bits.lower().removeprefix("w").split("a")
        wbits, abits = int(wb), int(ab)
    except ValueError:
        raise QuantInputError(f"bits must look like 'w4a8', got {bits!r}") from None
    return LinearQuantConfig(WeightQuantConfig(bits=wbits), ActQuantConfig(bits=abits, **act), transform, backend)
