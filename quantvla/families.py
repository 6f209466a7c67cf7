"""The model-family registry: everything the library, the CLI, the benchmarks and the plugin need
to know about a model family, in one record per family. Nothing else names a family.

    from quantvla import families
    fam = families.get("pi05")
    model = fam.build("tiny")                  # or "tiny-state", "full", or a config instance
    families.register(Family(...))             # a new family: the plugin and the CLI accept it

A family's facts come from its own pipeline (openpi for pi0.5, Isaac-GR00T for GR00T N1.5):
which checkpoint layouts its weights ship in, which LIBERO protocol it is evaluated with, how its
actions are normalised, how it encodes the gripper, and how its flow-matching time runs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

from quantvla.errors import QuantVLAError

Gripper = Literal["signed", "unit"]  # signed: LIBERO's -1 open .. +1 close; unit: g in [0, 1], run as sign(1 - 2g)
Flow = Literal["noise_at_one", "data_at_one"]  # where t = 1 sits: openpi (x_1 = noise) or GR00T (x_1 = actions)


@dataclass(frozen=True)
class Family:
    name: str
    model: type[nn.Module]  # built as model(config); has linear_roles() and attention_sites()
    configs: Mapping[str, Any]  # size name -> config dataclass: "tiny", "tiny-state" (trained policies), "full"
    layouts: Mapping[str, Any]  # checkpoint layouts (quantvla.models.checkpoint.Layout); the first is native
    protocol: str  # its LIBERO evaluation protocol, a key of reference/protocols.json
    action_norm: str  # "quantile" (openpi's q01/q99) or "min_max" (GR00T's)
    gripper: Gripper
    flow: Flow
    image_crop: float = 1.0  # the share of the image kept by a center crop before resizing (GR00T: 0.95)
    # Trained policies shipped in golden/policies, by subject name: "trained" (the default subject:
    # the policy that sees, once one meets the bar) and "trained-state" (object-state tokens for a camera).
    policies: Mapping[str, str] = field(default_factory=dict)
    description: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def config_class(self) -> type:
        return type(next(iter(self.configs.values())))

    @property
    def native_layout(self) -> str:
        """The layout the family's own code writes (and that trained policies are saved in)."""
        return next(iter(self.layouts))

    def config(self, size: str) -> Any:
        if size not in self.configs:
            raise QuantVLAError(f"unknown config {size!r} for {self.name}; choose one of: {', '.join(self.configs)}")
        return self.configs[size]

    def build(self, config: Any = "tiny") -> nn.Module:
        """A model of this family in eval mode, with random weights from the caller's seed."""
        return self.model(self.config(config) if isinstance(config, str) else config).eval()


_REGISTRY: dict[str, Family] = {}


def register(family: Family, replace: bool = False) -> Family:
    """Add a family; its model class must say which family it is (`family = "<name>"`), since a
    model instance is how the library finds its family again (checkpoints, adapters, artifacts)."""
    if family.name in _REGISTRY and not replace:
        raise QuantVLAError(f"a model family named {family.name!r} is registered already")
    if getattr(family.model, "family", None) != family.name:
        raise QuantVLAError(f"{family.model.__name__}.family must be {family.name!r} to register it as that family")
    _REGISTRY[family.name] = family
    return family


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get(name: str | None) -> Family:
    if name not in _REGISTRY:
        raise QuantVLAError(f"unknown model {name!r}; choose one of: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def of(model: nn.Module) -> Family:
    """The family of a model instance."""
    return get(getattr(model, "family", None))


def build(name: str, config: Any = "tiny") -> nn.Module:
    return get(name).build(config)


TRAINED = ("trained", "trained-state")  # the subject names of shipped trained policies


def is_trained(size: str) -> bool:
    """A size that names a trained policy (a folder with policy.json), not a config with random weights."""
    return size in TRAINED


@dataclass
class FPModel:
    """The floating-point model under test and the calibration buffer that goes with it."""

    model: nn.Module
    calibration: Any  # quantvla.CalibrationBuffer
    bundle: Any = None  # quantvla.policy.bundle.Bundle, for a trained policy


def load_fp(name: str, size: str = "trained", checkpoint: str | os.PathLike | None = None, entries: int = 16,
            seed: int = 0) -> FPModel:
    """The FP model under test, built the one way the plugin, the CLI and the benchmarks build it.
    size "trained" or "trained-state": a trained-policy folder (`checkpoint`, else the family's shipped
    policy of that name) with its recorded calibration buffer. Any other size: the family's config of
    that name with random weights drawn from the caller's torch seed (or `checkpoint` loaded in any
    supported layout) and a synthetic buffer of `entries` from `seed`."""
    from quantvla.calibration.buffer import CalibrationBuffer
    from quantvla.models.checkpoint import load_checkpoint
    from quantvla.policy.bundle import load_bundle, shipped_policy

    family = get(name)
    if is_trained(size):
        bundle = load_bundle(checkpoint if checkpoint is not None else shipped_policy(name, size))
        if bundle.family != family.name:
            raise QuantVLAError(f"{bundle.path} holds a {bundle.family} policy, not {family.name}")
        return FPModel(bundle.model.eval(), bundle.calibration(), bundle)
    model = family.build(size)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return FPModel(model.eval(), CalibrationBuffer.synthetic(model, entries, seed=seed))


def _builtin() -> None:
    from quantvla.models import gr00t_n15, pi05

    register(Family(
        name="pi05", model=pi05.PI05,
        configs={"tiny": pi05.TINY, "tiny-state": pi05.TINY_STATE, "tiny-vision": pi05.TINY_VISION,
                 "full": pi05.FULL},
        layouts=pi05.LAYOUTS, protocol="openpi", action_norm="quantile", gripper="signed", flow="noise_at_one",
        policies={"trained": "pi05-tiny-vision", "trained-state": "pi05-tiny-state"},
        description="pi0.5 (openpi / LeRobot): PaliGemma + Gemma-300M action expert"))
    register(Family(
        name="gr00t-n15", model=gr00t_n15.GR00TN15,
        configs={"tiny": gr00t_n15.TINY, "tiny-state": gr00t_n15.TINY_STATE,
                 "tiny-vision": gr00t_n15.TINY_VISION, "full": gr00t_n15.FULL},
        layouts=gr00t_n15.LAYOUTS, protocol="gr00t", action_norm="min_max", gripper="unit", flow="data_at_one",
        image_crop=0.95, policies={"trained": "gr00t-n15-tiny-vision", "trained-state": "gr00t-n15-tiny-state"},
        description="GR00T N1.5 (Isaac-GR00T / LeRobot): Eagle 2.5 + flow-matching DiT action head"))


_builtin()
