"""A trained policy as a bundle on disk: weights, normalisation statistics, tokenizer, calibration buffer.

A bundle is a folder:
  model.safetensors    the weights, in the family's real key layout (openpi / Isaac-GR00T), plus
                       the one key that is not in it: the object-state projection
  policy.json          family, model config, suite and tasks, training record, measured success
  norm_stats.json      openpi's layout: {"norm_stats": {"objects", "state", "actions"}}
  tokenizer.json       the word tokenizer of the instructions
  calibration.safetensors  a calibration buffer of held-out demo observations (quantize() input)
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from quantvla import families
from quantvla.calibration.buffer import CalibrationBuffer
from quantvla.data import data_dir
from quantvla.errors import QuantVLAError
from quantvla.eval.protocols import Protocol, protocol_for
from quantvla.io import write_json_atomic
from quantvla.models.checkpoint import load_checkpoint, save_checkpoint
from quantvla.policy.adapters import LiberoAdapter, NormStats, WordTokenizer, load_openpi_norm_stats
from quantvla.policy.state import StateAdapter


def config_from_dict(family: str, d: dict):
    """Rebuild a (nested, frozen) model config dataclass from its asdict() form."""
    def build(cls, values):
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name not in values:
                continue
            v = values[f.name]
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            kwargs[f.name] = build(type(default), v) if isinstance(v, dict) and dataclasses.is_dataclass(default) else v
        return cls(**kwargs)
    return build(families.get(family).config_class, d)


@dataclass
class Bundle:
    path: Path
    meta: dict
    model: torch.nn.Module
    tokenizer: WordTokenizer
    stats: dict[str, NormStats]

    @property
    def family(self) -> str:
        return self.meta["family"]

    @property
    def sees(self) -> bool:
        """A policy that reads the cameras (config tiny-vision), not object-state tokens."""
        return self.model.config.num_images > 0

    def adapter(self, goal: tuple[str, str] | None = None) -> StateAdapter | LiberoAdapter:
        """The observation adapter it was trained with: the cameras' (LiberoAdapter, the one every
        model-zoo model uses) for a policy that sees; object tokens of the task's `goal` otherwise."""
        c = self.model.config
        if self.sees:
            return LiberoAdapter.for_config(self.family, c, self.tokenizer, self.stats)
        return StateAdapter(self.family, c, self.tokenizer, self.stats, goal)

    def protocol(self) -> Protocol:
        """The family's LIBERO protocol, its cameras rendered at the resolution of the training frames."""
        p = protocol_for(self.family)
        return dataclasses.replace(p, render=self.meta["render"]) if self.meta.get("render") else p

    def calibration(self) -> CalibrationBuffer:
        return CalibrationBuffer.load(self.path / "calibration.safetensors")


def save_bundle(path, model, meta: dict, tokenizer: WordTokenizer, stats: dict[str, NormStats],
                calibration: CalibrationBuffer) -> Path:
    path = Path(path)
    save_checkpoint(model, path, families.of(model).native_layout)
    meta = {**meta, "family": model.family, "config": dataclasses.asdict(model.config)}
    fields = ("mean", "std", "q01", "q99", "min", "max")
    as_lists = {k: {f: None if getattr(v, f) is None else np.asarray(getattr(v, f)).tolist() for f in fields}
                for k, v in stats.items()}
    write_json_atomic(path / "norm_stats.json", {"norm_stats": as_lists})
    tokenizer.save(path / "tokenizer.json")
    calibration.save(path / "calibration.safetensors")
    write_json_atomic(path / "policy.json", meta)  # last: a folder with policy.json is complete
    return path


def shipped_policy(family: str, name: str = "trained") -> Path:
    """A trained policy shipped for a family (golden/policies/<its folder>): `name` is "trained" (the
    default subject) or "trained-state" (the state-based stand-in)."""
    folder = families.get(family).policies.get(name)
    if folder is None:
        raise QuantVLAError(f"no {name!r} policy ships for {family}; pass a policy folder, or use a random-weight "
                            "config (tiny, full)")
    return data_dir("golden") / "policies" / folder


def is_bundle(path) -> bool:
    return (Path(path) / "policy.json").is_file()


def load_bundle(path) -> Bundle:
    path = Path(path)
    if not (path / "policy.json").is_file():
        raise QuantVLAError(f"{path} is not a trained-policy folder (no policy.json); make one with "
                            "`python -m quantvla train-tiny`")
    meta = json.loads((path / "policy.json").read_text())
    family = meta.get("family")
    if family not in families.names():
        raise QuantVLAError(f"{path}/policy.json names an unknown family {family!r}")
    fam = families.get(family)
    model = fam.build(config_from_dict(family, meta["config"]))
    load_checkpoint(model, path, fam.native_layout)
    return Bundle(path, meta, model, WordTokenizer.load(path / "tokenizer.json"),
                  load_openpi_norm_stats(path / "norm_stats.json"))
