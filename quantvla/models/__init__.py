"""The model zoo in plain torch, with the real module names; the families are registered in
quantvla.families (which model class, configs, checkpoint layouts, protocol).

    model = build(name, "tiny")                     # name: quantvla.families.names(); or "full", a config
    with torch.device("meta"): big = build(name, "full")   # allocates nothing
"""

from __future__ import annotations

from torch import nn


def build(name: str, config="tiny") -> nn.Module:
    """A model of the named family, in eval mode, with seeded-by-caller random weights."""
    from quantvla import families

    return families.build(name, config)
