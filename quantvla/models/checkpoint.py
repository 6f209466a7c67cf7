"""Safetensors checkpoints in the real key layouts, loaded with strict validation.

A layout is a prefix on every key, plus aliases, ignored keys and the part of the model it holds;
each family lists its own beside its model (LAYOUTS in its model module) and
registers them in quantvla.families: openpi / LeRobot for pi0.5, Isaac-GR00T / LeRobot and
action-head-only files for GR00T N1.5.
A checkpoint is a .safetensors file, or a folder holding model.safetensors or a sharded set with
its index. Every problem (missing or unexpected keys, shapes, non-float dtypes, NaN/Inf, truncated
or unreadable files) is collected and reported in one CheckpointError naming the first offenders
and the layout that was expected.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from quantvla.errors import QuantVLAError
from quantvla.io import atomic_write, write_json_atomic

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
SHOW = 5  # offenders listed per kind of problem


class CheckpointError(QuantVLAError, ValueError):
    """A checkpoint that cannot be loaded as asked."""


@dataclass(frozen=True)
class Layout:
    name: str
    prefix: str
    # checkpoint key (after the prefix) -> model key, for tensors stored under another name
    aliases: dict = field(default_factory=dict)
    # checkpoint keys that exist in real files but that the model does not use
    ignored_prefixes: tuple = ()
    # the submodule the checkpoint holds ("" : the whole model)
    part: str = ""


def _layouts(family: str) -> dict[str, Layout]:
    from quantvla import families

    return dict(families.get(family).layouts)


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist; pass a .safetensors file or a folder with "
                              f"{SINGLE_NAME} or {INDEX_NAME}")
    index = path / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"{index} is not a valid safetensors index ({err}); it needs a 'weight_map'") \
                from None
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise CheckpointError(f"{index} lists shards that are not in {path}: {', '.join(missing[:SHOW])}")
        return [path / s for s in shards]
    if (path / SINGLE_NAME).is_file():
        return [path / SINGLE_NAME]
    raise CheckpointError(f"{path} holds neither {SINGLE_NAME} nor {INDEX_NAME}")


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint (file, folder or sharded set), by its stored key."""
    out: dict[str, torch.Tensor] = {}
    for f in _files(Path(path)):
        try:
            with safe_open(str(f), framework="pt") as handle:
                for key in handle.keys():
                    out[key] = handle.get_tensor(key)
        except Exception as err:  # safetensors raises its own error types for truncated/corrupt files
            raise CheckpointError(f"{f} is truncated or not a safetensors file ({err}); re-download or "
                                  "re-convert it") from None
    return out


def detect_layout(family: str, keys, model: nn.Module | None = None) -> Layout:
    """The layout whose prefix every key carries (the longest such prefix); among unprefixed
    layouts, the one whose part's own keys cover the most stored keys (a bare head-only file)."""
    layouts = sorted(_layouts(family).values(), key=lambda lay: -len(lay.prefix))
    keys = list(keys)
    for layout in layouts:
        if layout.prefix and keys and all(k.startswith(layout.prefix) for k in keys):
            return layout
    bare = [lay for lay in layouts if not lay.prefix]
    if model is None or len(bare) == 1:
        return next(lay for lay in bare if not lay.part)

    def covered(lay: Layout) -> int:
        own = set(_target(model, lay).state_dict())
        return sum(lay.aliases.get(k, k) in own for k in keys)

    return max(bare, key=lambda lay: (covered(lay), not lay.part))


def _target(model: nn.Module, layout: Layout) -> nn.Module:
    return model.get_submodule(layout.part) if layout.part else model


def _expected(layout: Layout, model: nn.Module) -> str:
    sample = next(iter(_target(model, layout).state_dict()))
    part = f"; the {layout.part} only" if layout.part else ""
    return f"layout {layout.name!r} of {model.family} (keys like {layout.prefix}{sample}{part})"


def load_checkpoint(model: nn.Module, path: str | os.PathLike, layout: str = "auto") -> Layout:
    """Load `path` into `model` (tensors cast to the model's dtypes), or raise one CheckpointError."""
    family = model.family
    stored = read_tensors(path)
    if layout == "auto":
        lay = detect_layout(family, stored, model)
    elif layout in _layouts(family):
        lay = _layouts(family)[layout]
    else:
        raise CheckpointError(f"unknown layout {layout!r} for {family}; choose auto or one of "
                              f"{', '.join(_layouts(family))}")
    want = _target(model, lay).state_dict()
    got: dict[str, torch.Tensor] = {}
    problems: dict[str, list[str]] = {"unexpected keys": [], "missing keys": [], "shape mismatches": [],
                                      "non-float tensors": [], "NaN/Inf tensors": []}
    for key, tensor in stored.items():
        if not key.startswith(lay.prefix):
            problems["unexpected keys"].append(key)
            continue
        name = key[len(lay.prefix):]
        if name.startswith(lay.ignored_prefixes):
            continue
        name = lay.aliases.get(name, name)
        if name not in want:
            problems["unexpected keys"].append(key)
            continue
        if name in got and not torch.equal(got[name], tensor):
            problems["shape mismatches"].append(f"{key}: differs from the tied tensor already read")
        got[name] = tensor
    for name, ref in want.items():
        t = got.get(name)
        if t is None:
            problems["missing keys"].append(lay.prefix + name)
        elif t.shape != ref.shape:
            problems["shape mismatches"].append(f"{lay.prefix}{name}: {tuple(t.shape)}, expected {tuple(ref.shape)}")
        elif not t.is_floating_point():
            problems["non-float tensors"].append(f"{lay.prefix}{name}: {t.dtype}, expected {ref.dtype}")
        elif not torch.isfinite(t).all():
            problems["NaN/Inf tensors"].append(lay.prefix + name)
    found = {k: v for k, v in problems.items() if v}
    if found:
        lines = [f"checkpoint {path} does not match {_expected(lay, model)}:"]
        for kind, items in found.items():
            more = f" (and {len(items) - SHOW} more)" if len(items) > SHOW else ""
            lines.append(f"  {len(items)} {kind}: {', '.join(items[:SHOW])}{more}")
        raise CheckpointError("\n".join(lines))
    with torch.no_grad():
        for name, ref in want.items():
            ref.copy_(got[name].to(ref.dtype))
    return lay


def save_checkpoint(model: nn.Module, path: str | os.PathLike, layout: str, shard_bytes: int | None = None) -> Path:
    """Write `model` in a real layout: a folder with model.safetensors, or shards plus their index
    when shard_bytes is given. Each file is written to a temporary name and renamed (atomic)."""
    lay = _layouts(model.family)[layout]
    reverse = {v: k for k, v in lay.aliases.items()}
    tensors = {lay.prefix + reverse.get(k, k): v.detach().contiguous().clone()
               for k, v in _target(model, lay).state_dict().items()}
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    if not shard_bytes:
        atomic_write(out / SINGLE_NAME, lambda tmp: save_file(tensors, tmp))
        return out
    shards: list[dict] = [{}]
    size = 0
    for key in sorted(tensors):
        nbytes = tensors[key].numel() * tensors[key].element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensors[key]
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        atomic_write(out / name, lambda tmp, shard=shard: save_file(shard, tmp))
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    write_json_atomic(out / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return out
