"""Quantized-model artifacts: a folder with `model.safetensors` (integer weights, scales, transform
buffers, FP parameters) and `quantvla.json` (model and quantizer configs, alpha, beta, the quantized
layer list, sha256 of the source model, the calibration buffer and the saved tensors). Loading
rebuilds the model from the JSON alone and checks everything, naming precisely what differs."""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from quantvla import families
from quantvla.api import _set_module
from quantvla.calibration.buffer import CalibrationBuffer
from quantvla.errors import QuantVLAError
from quantvla.io import atomic_write, tensor_digest, write_json_atomic
from quantvla.presets import QuantConfig
from quantvla.quant.linear import QuantLinear

FORMAT = 1
WEIGHTS, META = "model.safetensors", "quantvla.json"


class ArtifactError(QuantVLAError, ValueError):
    """An artifact that is incomplete, corrupt or does not match what it is checked against."""


def _from_dict(cls, data):
    """Rebuild a (nested) frozen dataclass from dataclasses.asdict output."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        v, t = data[f.name], hints[f.name]
        kwargs[f.name] = _from_dict(t, v) if dataclasses.is_dataclass(t) else v
    return cls(**kwargs)


def save_quantized(model: nn.Module, path, config: QuantConfig, source: nn.Module,
                   calibration: CalibrationBuffer) -> Path:
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    scales = getattr(model, "quantvla_scales", {"alpha": {}, "beta": {}})
    meta = {
        "format": FORMAT,
        "family": model.family,
        "model_config": dataclasses.asdict(model.config),
        "quant_config": config.to_dict(),
        "quantized": [n for n, m in model.named_modules() if isinstance(m, QuantLinear)],
        "alpha": scales["alpha"],
        "beta": scales["beta"],
        "source_sha256": tensor_digest(source.state_dict()),
        "calibration_sha256": calibration.digest(),
        "tensors_sha256": tensor_digest(tensors),
    }
    atomic_write(out / WEIGHTS, lambda tmp: save_file(tensors, tmp))
    write_json_atomic(out / META, meta)
    return out


def load_quantized(path, source: nn.Module | None = None, calibration: CalibrationBuffer | None = None) -> nn.Module:
    """Rebuild and load a quantized model; with `source`/`calibration`, also check it was made from them."""
    path = Path(path)
    try:
        meta = json.loads((path / META).read_text())
        tensors = load_file(str(path / WEIGHTS))
    except FileNotFoundError as err:
        raise ArtifactError(f"{path} is not a quantvla artifact: {Path(err.filename).name} is missing") from None
    except Exception as err:
        raise ArtifactError(f"{path}: cannot read the artifact ({err})") from None
    problems = []
    if meta.get("format") != FORMAT:
        problems.append(f"format {meta.get('format')!r}, this library reads {FORMAT}")
    if meta.get("family") not in families.names():
        raise ArtifactError(f"{path}: unknown model family {meta.get('family')!r}")
    if tensor_digest(tensors) != meta.get("tensors_sha256"):
        problems.append("the tensors' sha256 differs from the one recorded (file modified or corrupt)")
    if source is not None and tensor_digest(source.state_dict()) != meta.get("source_sha256"):
        problems.append("it was not made from the given source model (source sha256 differs)")
    if calibration is not None and calibration.digest() != meta.get("calibration_sha256"):
        problems.append("it was not calibrated on the given buffer (calibration sha256 differs)")
    family = families.get(meta["family"])
    config = QuantConfig.from_dict(meta["quant_config"])
    model = family.model(_from_dict(family.config_class, meta["model_config"]))
    model.eval()
    mods = dict(model.named_modules())
    for name in meta["quantized"]:
        lin = mods.get(name)
        if not isinstance(lin, nn.Linear):
            problems.append(f"quantized layer {name} is not a linear of {meta['family']}")
            continue
        _set_module(model, name, QuantLinear(lin.in_features, lin.out_features, lin.bias is not None,
                                             config.linear, name=name))
    if not problems:
        want = model.state_dict()
        missing = sorted(set(want) - set(tensors))
        unexpected = sorted(set(tensors) - set(want))
        shapes = [k for k in set(want) & set(tensors) if want[k].shape != tensors[k].shape]
        for label, keys in (("missing tensors", missing), ("unexpected tensors", unexpected),
                            ("shape mismatches", shapes)):
            if keys:
                problems.append(f"{len(keys)} {label}: {', '.join(keys[:5])}")
    if problems:
        raise ArtifactError(f"artifact {path} does not check out:\n  " + "\n  ".join(problems))
    with torch.no_grad():
        for k, t in model.state_dict().items():
            t.copy_(tensors[k])
    model.quantvla_scales = {"alpha": meta["alpha"], "beta": meta["beta"]}
    return model
