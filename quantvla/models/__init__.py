"""The model zoo: pi0.5 and GR00T N1.5 in plain torch, with their real module names.

    model = build("pi05", "tiny")                   # or "full", or a PI05Config / GR00TConfig
    with torch.device("meta"): big = build("gr00t-n15", "full")   # allocates nothing
"""

from __future__ import annotations

from torch import nn

from quantvla.models import gr00t_n15, pi05

FAMILIES = {
    "pi05": (pi05.PI05, {"tiny": pi05.TINY, "tiny-state": pi05.TINY_STATE, "full": pi05.FULL}),
    "gr00t-n15": (gr00t_n15.GR00TN15, {"tiny": gr00t_n15.TINY, "tiny-state": gr00t_n15.TINY_STATE,
                                       "full": gr00t_n15.FULL}),
}


def build(name: str, config="tiny") -> nn.Module:
    """A model of the named family, in eval mode, with seeded-by-caller random weights."""
    if name not in FAMILIES:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(FAMILIES)}")
    cls, presets = FAMILIES[name]
    if isinstance(config, str):
        if config not in presets:
            raise ValueError(f"unknown config {config!r} for {name}; choose one of: {', '.join(presets)}")
        config = presets[config]
    return cls(config).eval()
