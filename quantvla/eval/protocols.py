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


# Each model family's own LIBERO protocol (models.md section 3).
FAMILY_PROTOCOL = {"pi05": "openpi", "gr00t-n15": "gr00t"}


def protocol_for(family: str) -> Protocol:
    return load_protocol(FAMILY_PROTOCOL.get(family, "openpi"))


def load_protocol(name: str) -> Protocol:
    data = json.loads((reference_dir() / "protocols.json").read_text())
    if name not in data or name == "note":
        raise QuantVLAError(f"unknown protocol {name!r}; choose one of: {', '.join(k for k in data if k != 'note')}")
    return Protocol(name=name, **data[name])
