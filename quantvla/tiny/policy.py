"""A trained small policy as a bundle on disk, and its LIBERO input pipeline.

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

from quantvla.calibration.buffer import CalibrationBuffer
from quantvla.errors import QuantVLAError
from quantvla.io import write_json_atomic
from quantvla.models import gr00t_n15, pi05
from quantvla.models.checkpoint import load_checkpoint, save_checkpoint
from quantvla.models.observation import ModelInputs
from quantvla.models.policy import NormStats, WordTokenizer, chunk_to_actions, load_openpi_norm_stats
from quantvla.tiny.features import ROBOT_DIM, object_tokens

LAYOUT = {"pi05": "openpi", "gr00t-n15": "isaac"}
_ROOT = Path(__file__).resolve().parents[2]
ACTION_NORM = {"pi05": "quantile", "gr00t-n15": "min_max"}  # each family's own convention


def model_actions(family: str, actions: np.ndarray) -> np.ndarray:
    """Environment actions in the family's own convention, before normalization: GR00T stores the
    gripper as g in [0, 1] (-1 open -> 1), binarized to sign(1 - 2g) at run time."""
    a = np.asarray(actions, dtype=np.float64).copy()
    if family == "gr00t-n15":
        a[..., 6] = (1.0 - a[..., 6]) / 2.0
    return a


class StateAdapter:
    """LIBERO observation -> ModelInputs with object-state tokens (no images); action chunk -> [T, 7].
    `goal` = (object, container), the task's BDDL goal objects."""

    def __init__(self, family: str, config, tokenizer: WordTokenizer, stats: dict[str, NormStats],
                 goal: tuple[str, str] | None = None):
        self.family, self.config, self.tokenizer, self.stats, self.goal = family, config, tokenizer, stats, goal

    def normalize(self, tokens: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[..., NUM_OBJECTS, OBJECT_DIM] raw tokens -> normalized objects and (GR00T) state."""
        shape = tokens.shape
        flat = self.stats["objects"].normalize(tokens.reshape(*shape[:-2], -1), "mean_std")
        objects = torch.from_numpy(flat.reshape(shape).astype(np.float32))
        state = None
        if self.family == "gr00t-n15":
            robot = self.stats["state"].normalize(tokens[..., 0, :ROBOT_DIM], "mean_std")
            state = torch.zeros(*shape[:-2], self.config.state_dim)
            state[..., :ROBOT_DIM] = torch.from_numpy(robot.astype(np.float32))
        return objects, state

    def encode(self, instructions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [self.tokenizer.encode(t, self.config.max_token_len) for t in instructions]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    def batch(self, tokens: np.ndarray, instructions: list[str]) -> ModelInputs:
        """Model inputs for a batch of raw object tokens [B, N, D] and their instructions."""
        b = tokens.shape[0]
        objects, state = self.normalize(tokens)
        ids, mask = self.encode(instructions)
        return ModelInputs(torch.zeros(b, 0, 3, 1, 1), torch.zeros(b, 0, dtype=torch.bool), ids, mask, state, objects)

    def inputs(self, obs: dict, instruction: str, n_images: int = 0) -> ModelInputs:
        if self.goal is None:
            raise QuantVLAError("this state-based policy needs the task's goal objects (StateAdapter(goal=...))")
        return self.batch(object_tokens(obs, self.goal)[None], [instruction])

    def target(self, actions: np.ndarray) -> np.ndarray:
        """Environment actions [..., 7] -> the model's normalized training target [..., 7]."""
        a = model_actions(self.family, actions)
        return self.stats["actions"].normalize(a, ACTION_NORM[self.family]).astype(np.float32)

    def actions(self, chunk: torch.Tensor) -> np.ndarray:
        a = chunk_to_actions(chunk, self.stats["actions"], ACTION_NORM[self.family], self.family)
        return np.clip(a, -1.0, 1.0)


def config_class(family: str):
    return {"pi05": pi05.PI05Config, "gr00t-n15": gr00t_n15.GR00TConfig}[family]


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
    return build(config_class(family), d)


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

    def adapter(self, goal: tuple[str, str] | None = None) -> StateAdapter:
        return StateAdapter(self.family, self.model.config, self.tokenizer, self.stats, goal)

    def calibration(self) -> CalibrationBuffer:
        return CalibrationBuffer.load(self.path / "calibration.safetensors")


def save_bundle(path, model, meta: dict, tokenizer: WordTokenizer, stats: dict[str, NormStats],
                calibration: CalibrationBuffer) -> Path:
    path = Path(path)
    save_checkpoint(model, path, LAYOUT[model.family])
    meta = {**meta, "family": model.family, "config": dataclasses.asdict(model.config)}
    fields = ("mean", "std", "q01", "q99", "min", "max")
    as_lists = {k: {f: None if getattr(v, f) is None else np.asarray(getattr(v, f)).tolist() for f in fields}
                for k, v in stats.items()}
    write_json_atomic(path / "norm_stats.json", {"norm_stats": as_lists})
    tokenizer.save(path / "tokenizer.json")
    calibration.save(path / "calibration.safetensors")
    write_json_atomic(path / "policy.json", meta)  # last: a folder with policy.json is complete
    return path


def shipped_policy(family: str) -> Path:
    """The trained policy shipped for a family: golden/policies/<family>-tiny-state in a source
    checkout, pytest_quantvla/golden/policies/... in a wheel."""
    for golden in (_ROOT / "pytest_quantvla" / "golden", _ROOT / "golden"):
        if (golden / "policies").is_dir():
            return golden / "policies" / f"{family}-tiny-state"
    raise QuantVLAError("the shipped policies (golden/policies) are missing next to the package; "
                        "reinstall pytest-quantvla")


def is_bundle(path) -> bool:
    return (Path(path) / "policy.json").is_file()


def load_bundle(path) -> Bundle:
    from quantvla.models import FAMILIES
    path = Path(path)
    if not (path / "policy.json").is_file():
        raise QuantVLAError(f"{path} is not a trained-policy folder (no policy.json); make one with "
                            "`python -m quantvla train-tiny`")
    meta = json.loads((path / "policy.json").read_text())
    family = meta.get("family")
    if family not in FAMILIES:
        raise QuantVLAError(f"{path}/policy.json names an unknown family {family!r}")
    model = FAMILIES[family][0](config_from_dict(family, meta["config"])).eval()
    load_checkpoint(model, path, LAYOUT[family])
    return Bundle(path, meta, model, WordTokenizer.load(path / "tokenizer.json"),
                  load_openpi_norm_stats(path / "norm_stats.json"))
