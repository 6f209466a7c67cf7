"""The calibration buffer: unlabeled model inputs plus, for each, the diffusion noise that teacher
and student both start from. Same observation, same noise, same time steps: every comparison
between the FP model and the quantized one is paired."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from quantvla.errors import QuantVLAError
from quantvla.io import atomic_write, tensor_digest
from quantvla.models.observation import ModelInputs

_FIELDS = ("images", "image_mask", "tokens", "token_mask", "state", "objects")


@dataclass
class CalibrationBuffer:
    inputs: list[ModelInputs]
    noise: list[torch.Tensor]  # one [1, horizon, action_dim] per entry

    def __len__(self) -> int:
        return len(self.inputs)

    @classmethod
    def from_inputs(cls, inputs: list[ModelInputs], horizon: int, action_dim: int, seed: int = 0) -> CalibrationBuffer:
        gen = torch.Generator().manual_seed(seed)
        return cls(list(inputs), [torch.randn(1, horizon, action_dim, generator=gen) for _ in inputs])

    @classmethod
    def record(cls, adapter, observations, model, seed: int = 0) -> CalibrationBuffer:
        """Unlabeled (observation, instruction) pairs through the model's own input pipeline
        (a quantvla.models.policy.LiberoAdapter), each with seeded diffusion noise."""
        c = model.config
        inputs = [adapter.inputs(obs, instruction, c.num_images) for obs, instruction in observations]
        return cls.from_inputs(inputs, c.action_horizon, c.action_dim, seed)

    @classmethod
    def synthetic(cls, model, n: int, seed: int = 0) -> CalibrationBuffer:
        """n seeded synthetic inputs through the model's own example-input pipeline."""
        c = model.config
        return cls.from_inputs([model.example_inputs(seed=seed * 100_003 + i) for i in range(n)],
                               c.action_horizon, c.action_dim, seed)

    def to(self, device) -> CalibrationBuffer:
        """The same entries on another device (noise included, so pairs stay paired)."""
        return CalibrationBuffer([x.to(device) for x in self.inputs], [z.to(device) for z in self.noise])

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, (x, z) in enumerate(zip(self.inputs, self.noise, strict=True)):
            for f in _FIELDS:
                t = getattr(x, f)
                if t is not None:
                    out[f"{i}.{f}"] = t.contiguous()
            out[f"{i}.noise"] = z.contiguous()
        return out

    def digest(self) -> str:
        """sha256 of every tensor of the buffer (names, dtypes, shapes, bytes)."""
        return tensor_digest(self.tensors())

    def save(self, path) -> Path:
        path = Path(path)
        tensors = self.tensors()
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"entries": str(len(self))}))
        return path

    @classmethod
    def load(cls, path) -> CalibrationBuffer:
        try:
            tensors = load_file(str(path))
        except Exception as err:
            raise QuantVLAError(f"{path} is not a calibration buffer ({err})") from None
        n = 1 + max(int(k.split(".")[0]) for k in tensors) if tensors else 0
        inputs, noise = [], []
        for i in range(n):
            get = lambda f, i=i: tensors.get(f"{i}.{f}")  # noqa: E731
            if get("noise") is None or get("tokens") is None:
                raise QuantVLAError(f"{path}: entry {i} is incomplete (needs tokens and noise)")
            inputs.append(ModelInputs(*(get(f) for f in _FIELDS)))
            noise.append(get("noise"))
        return cls(inputs, noise)

    def describe(self) -> str:
        return json.dumps({"entries": len(self), "digest": self.digest()[:16]})
