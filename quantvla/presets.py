"""Quantization presets: the paper's settings and the baselines the gates compare against.

Every knob is a field of QuantConfig and is written into each artifact; nothing comes from the
environment.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace

from quantvla.errors import QuantInputError
from quantvla.quant.config import ActQuantConfig, DuQuantConfig, LinearQuantConfig, WeightQuantConfig

LAYOUT_QUANTVLA = ("llm", "dit_mlp")  # all LLM linears + the DiT MLPs; DiT attention stays FP
LAYOUT_FULL = ("llm", "dit_mlp", "dit_attn")  # every LLM and DiT linear (the paper's failing row)
LAYOUT_VISION = ("vision", *LAYOUT_QUANTVLA)  # QuantVLA's layout plus the vision tower and projector


@dataclass(frozen=True)
class QuantConfig:
    name: str
    linear: LinearQuantConfig | None  # None: nothing is quantized (the fp16 baseline)
    roles: tuple[str, ...] = LAYOUT_QUANTVLA
    atm: bool = True
    ohb: bool = True
    clip_log: float = 0.30  # |log alpha|, |log beta| <= clip_log (paper App. D; Sec. 4.1 says 0.4)
    neutral_log: float = 0.03  # |log alpha| < neutral_log -> alpha = 1 (paper App. D)
    act_batches: int = 32  # buffer entries whose activations set the quantizers (paper App. D)
    fit_steps: int = 128  # denoising calls used to fit alpha and beta (paper App. D)
    max_rows: int = 2048  # activation rows kept per layer for DuQuant/static scales
    denoising_steps: int | None = None  # None: the model's default
    seed: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> QuantConfig:
        d = dict(d)
        linear = d.pop("linear")
        d["roles"] = tuple(d["roles"])
        return cls(linear=LinearQuantConfig.from_dict(linear) if linear else None, **d)


def _linear(wbits: int, abits: int, transform: DuQuantConfig | None, mse_clip: bool = True,
            rounding: str = "nearest") -> LinearQuantConfig:
    clip = {} if mse_clip else {"clip_ratios": (1.0,)}
    weight = WeightQuantConfig(bits=wbits, rounding=rounding, **clip)
    return LinearQuantConfig(weight, ActQuantConfig(bits=abits), transform)


_DUQUANT = DuQuantConfig()  # block 64, smoothing 0.15, greedy rotations, zigzag permutation
_SMOOTH_ONLY = DuQuantConfig(smooth_strength=0.5, rotation_steps=0, permute=False)

# The quantvla presets round weights with GPTQ error feedback on the paper's grid (same integers,
# scales, storage and kernels as RTN): on the small trained policies the paper's round-to-nearest
# loses LIBERO episodes that GPTQ keeps (docs/method.md). quantvla-rtn-w4a8 is the paper verbatim.
PRESETS: dict[str, QuantConfig] = {p.name: p for p in [
    QuantConfig("quantvla-w4a8", _linear(4, 8, _DUQUANT, rounding="gptq")),
    QuantConfig("quantvla-w4a4", _linear(4, 4, _DUQUANT, rounding="gptq")),
    QuantConfig("quantvla-w8a8", _linear(8, 8, _DUQUANT, rounding="gptq")),
    QuantConfig("quantvla-rtn-w4a8", _linear(4, 8, _DUQUANT)),
    QuantConfig("fp16", None, roles=(), atm=False, ohb=False),
    QuantConfig("rtn-w4a8", _linear(4, 8, None, mse_clip=False), atm=False, ohb=False),
    QuantConfig("rtn-w4a4", _linear(4, 4, None, mse_clip=False), atm=False, ohb=False),
    QuantConfig("rtn-full-w4a4", _linear(4, 4, None, mse_clip=False), roles=LAYOUT_FULL, atm=False, ohb=False),
    QuantConfig("smoothquant-w8a8", _linear(8, 8, _SMOOTH_ONLY), atm=False, ohb=False),
    # DuQuant as published (round to nearest) over every LLM and DiT linear: the paper's failing row
    QuantConfig("duquant-full-w4a8", _linear(4, 8, _DUQUANT), roles=LAYOUT_FULL, atm=False, ohb=False),
    # quantvla-w4a8 without ATM/OHB: what the two calibrated scalars add
    QuantConfig("layout-only-w4a8", _linear(4, 8, _DUQUANT, rounding="gptq"), atm=False, ohb=False),
    # opt-in, beyond the paper (which keeps the vision tower in float): quantvla-w4a8 over the vision
    # tower and its projector too
    QuantConfig("quantvla-w4a8-vision", _linear(4, 8, _DUQUANT, rounding="gptq"), roles=LAYOUT_VISION),
]}


def preset(name: str, **overrides) -> QuantConfig:
    """A preset by name, with fields overridden: preset("quantvla-w4a8", clip_log=0.4)."""
    if name not in PRESETS:
        raise QuantInputError(f"unknown quantizer preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)


# The reference quantizer's bare name: QuantVLA at whatever bit-width the run asks for.
REFERENCE = "quantvla"


def preset_name(quantizer: str, bits: str) -> str:
    """The name a run's quantizer goes by in goldens, the paper's table and gate reports: the bare
    reference at w4a8 is "quantvla-w4a8"; any other quantizer keeps its own name."""
    return f"{REFERENCE}-{bits}" if quantizer == REFERENCE else quantizer


__all__ = ["QuantConfig", "PRESETS", "preset", "preset_name", "REFERENCE", "LAYOUT_QUANTVLA", "LAYOUT_FULL",
           "LAYOUT_VISION"]
