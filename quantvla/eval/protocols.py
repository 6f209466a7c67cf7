"""Evaluation protocols (openpi, GR00T, the QuantVLA authors' pi0.5 variant) as data."""

from __future__ import annotations

import json
from dataclasses import dataclass

from quantvla.errors import QuantVLAError
from quantvla.reference import reference_dir


@dataclass(frozen=True)
class Protocol:
    name: str
    max_steps: dict
    wait_steps: int
    replan_steps: int  # actions executed per policy query
    chunk: int
    render: int
    model_image: int
    rotate_180: bool
    seed: int
    trials_per_task: int
    denoising_steps: int
    binarize_gripper: bool

    def steps_for(self, suite: str) -> int:
        if suite not in self.max_steps:
            raise QuantVLAError(f"protocol {self.name} has no max_steps for suite {suite!r}; "
                                f"known: {', '.join(self.max_steps)}")
        return self.max_steps[suite]


DEFAULT_PROTOCOL = "openpi"


def protocol_for(family: str | None) -> Protocol:
    """A family's own LIBERO protocol (its record in quantvla.families); openpi's without a family."""
    from quantvla import families

    return load_protocol(DEFAULT_PROTOCOL if family is None else families.get(family).protocol)


def load_protocol(name: str) -> Protocol:
    data = json.loads((reference_dir() / "protocols.json").read_text())
    if name not in data or name == "note":
        raise QuantVLAError(f"unknown protocol {name!r}; choose one of: {', '.join(k for k in data if k != 'note')}")
    return Protocol(name=name, **data[name])
