"""Command-line options and ini keys, parsed once into a frozen RunConfig kept in config.stash."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

MODELS = ("pi05", "gr00t-n15")
BITS = ("w4a8", "w4a4", "w8a8")
CONFIGS = ("tiny", "full")


@dataclass(frozen=True)
class RunConfig:
    model: str | None
    config: str
    bits: str
    device: str
    seed: int


RUN_KEY = pytest.StashKey[RunConfig]()

# name, ini/CLI default, help, valid choices (None: free-form)
_OPTIONS = [
    ("model", None, "model under test: " + " | ".join(MODELS) + "; turns the built-in checks on", MODELS),
    ("config", "tiny", "model size: tiny (CPU, small checkpoints; the default) | full", CONFIGS),
    ("bits", "w4a8", "bit-width setting: " + " | ".join(BITS), BITS),
    ("device", "cpu", "cpu | cuda | cuda:N", None),
    ("seed", "0", "seed of every random choice (an integer)", None),
]


def add_options(parser: pytest.Parser) -> None:
    group = parser.getgroup("quantvla", "quantized VLA policies held to the QuantVLA paper")
    for name, default, help_text, _ in _OPTIONS:
        group.addoption(f"--quantvla-{name}", dest=f"quantvla_{name}", default=None, help=help_text)
        parser.addini(f"quantvla_{name}", help_text, default=default)


def _value(config: pytest.Config, name: str) -> str | None:
    cli = config.getoption(f"quantvla_{name}")
    return cli if cli is not None else (config.getini(f"quantvla_{name}") or None)


def parse(config: pytest.Config) -> RunConfig:
    """CLI > ini > defaults. An invalid value is a usage error listing the valid choices."""
    values = {}
    for name, _, _, choices in _OPTIONS:
        v = _value(config, name)
        if v is not None and choices is not None and v not in choices:
            raise pytest.UsageError(f"--quantvla-{name}={v!r} is not valid; choose one of: {', '.join(choices)}")
        values[name] = v
    device = values["device"]
    if not (device == "cpu" or device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())):
        raise pytest.UsageError(f"--quantvla-device={device!r} is not valid; use cpu, cuda or cuda:N")
    try:
        seed = int(values["seed"])
    except ValueError:
        raise pytest.UsageError(f"--quantvla-seed={values['seed']!r} is not an integer") from None
    return RunConfig(values["model"], values["config"], values["bits"], device, seed)
