"""Command-line options and ini keys, parsed once into a frozen RunConfig kept in config.stash."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

BITS = ("w4a8", "w4a4", "w8a8", "w8a16", "w4a16")  # the same as quantvla.quantizer.BITS (a test says so)
DEFAULT_BITS = "w4a8"
# Weight-only settings (third-party quantizers only: the reference quantizes activations too) are
# held to the reference at the same weight bits with 8-bit activations: quantizing less, they
# should drift no more.
WEIGHT_ONLY = {"w8a16": "w8a8", "w4a16": "w4a8"}
TRAINED = ("trained", "trained-state")  # the same as quantvla.families.TRAINED (a test says so)
CONFIGS = (*TRAINED, "tiny", "full")
FORWARDS = ("eager", "fused")  # the same as quantvla.quant.fused.FORWARDS (a test says so)


@dataclass(frozen=True)
class RunConfig:
    model: str | None
    size: str  # --quantvla-config: "trained" / "trained-state" (a trained policy), "tiny" or "full" (random weights)
    bits: str
    device: str
    seed: int
    quantizer: str
    checkpoint: Path | None
    golden_dir: Path | None
    update_golden: bool
    report: Path | None
    episodes: int = 20
    suites: tuple[str, ...] | None = None  # None: the trained policy's suite (libero_spatial otherwise)
    margin: float = 0.10
    record: Path | None = None
    allow_inconclusive: bool = False
    rootdir: Path | None = None  # pytest's rootdir: a third-party quantizer's own goldens go under it
    forward: str = "eager"  # QuantLinear's CPU forward: "eager" (the reference) or "fused" (quant/fused.py)

    @property
    def trained(self) -> bool:
        """The subject is a trained policy (a folder with policy.json), not random weights."""
        return self.size in TRAINED

    @property
    def reference_bits(self) -> str:
        """The reference quantizer's setting this run is compared with (attention drift)."""
        return WEIGHT_ONLY.get(self.bits, self.bits)

    @property
    def quantizer_name(self) -> str:
        """The quantizer as goldens and the paper's table name it ("quantvla" -> "quantvla-<bits>")."""
        from quantvla.presets import preset_name
        return preset_name(self.quantizer, self.bits)

    @property
    def family(self) -> str:
        """The model family under test. Only runs with --quantvla-model collect checks or build a model."""
        if self.model is None:
            raise pytest.UsageError("this needs --quantvla-model (or the quantvla_model ini key)")
        return self.model

    @property
    def prefix(self) -> str:
        """Test-id prefix: quantvla/<model>/<bits>, plus the quantizer when it is not the reference."""
        q = "" if self.quantizer == "quantvla" else f"/{self.quantizer}"
        return f"quantvla/{self.model}/{self.bits}{q}"


RUN_KEY = pytest.StashKey[RunConfig]()

# name, ini/CLI default, help, valid choices (None: free-form)
_OPTIONS = [
    ("model", None, "model under test, a registered family (quantvla.families; an unknown name lists them); turns "
                    "the built-in checks on", None),
    ("config", "trained", "trained (the default: the small LIBERO policy trained on expert demos, shipped in "
                          "golden/policies; it sees where a seeing policy ships, see golden/policies/README.md) | "
                          "trained-state (the state-based policy: object-state tokens stand in for the cameras) | "
                          "tiny (random weights, images) | full (random weights, the real sizes)", CONFIGS),
    ("bits", None, "bit-width setting: " + " | ".join(BITS) + f" (default {DEFAULT_BITS}, or the quantizer's own; "
                   "a16: weight-only, third-party quantizers)", BITS),
    ("quantizer", "quantvla", "quantvla (the reference, the default) | a preset name | pkg.module:callable | "
                              "a name registered in the pytest_quantvla.quantizers entry-point group", None),
    ("checkpoint", None, "FP checkpoint to load (safetensors file or folder, any supported layout; with "
                         "--quantvla-config=trained, a policy folder written by python -m quantvla train-tiny)", None),
    ("device", "cpu", "cpu | cuda | cuda:N", None),
    ("seed", "0", "seed of every random choice (an integer)", None),
    ("golden_dir", None, "folder of golden statistics (default: the goldens shipped with the plugin)", None),
    ("report", None, "write a JSON report of every measurement to this path", None),
    ("episodes", "20", "LIBERO gate: paired episodes (FP and quantized on the same init state) per suite", None),
    ("suites", None, "LIBERO gate: comma-separated suites (default: the trained policy's, else libero_spatial): "
                     "libero_spatial, libero_object, libero_goal, libero_10", None),
    ("margin", "0.10", "LIBERO gate: non-inferiority margin below the paper's quantized-minus-FP delta", None),
    ("record", None, "LIBERO gate: save each failed episode as an animated GIF in this folder (replayed with the "
                     "camera on)", None),
    ("forward", "eager", "QuantLinear's forward on the CPU: eager (the reference, the default) | fused (one C++ "
                         "call per layer, bit-identical, about 2x faster on small policies; compiled on first use, "
                         "checked by fused_exact)", FORWARDS),
]
SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10")


def add_options(parser: pytest.Parser) -> None:
    group = parser.getgroup("quantvla", "quantized VLA policies held to the QuantVLA paper")
    for name, default, help_text, _ in _OPTIONS:
        group.addoption(f"--quantvla-{name.replace('_', '-')}", dest=f"quantvla_{name}", default=None,
                        help=help_text)
        parser.addini(f"quantvla_{name}", help_text, default=default)
    group.addoption("--quantvla-update-golden", dest="quantvla_update_golden", action="store_true", default=None,
                    help="write the golden statistics measured now (atomically) and print what changed")
    parser.addini("quantvla_update_golden", "see --quantvla-update-golden", type="bool", default=False)
    group.addoption("--quantvla-allow-inconclusive", dest="quantvla_allow_inconclusive", action="store_true",
                    default=None, help="LIBERO gate: an inconclusive verdict (underpowered, simulator errors) "
                                       "warns instead of failing the run")
    parser.addini("quantvla_allow_inconclusive", "see --quantvla-allow-inconclusive", type="bool", default=False)


def _value(config: pytest.Config, name: str) -> Any:
    cli = config.getoption(f"quantvla_{name}")
    return cli if cli is not None else (config.getini(f"quantvla_{name}") or None)


def parse(config: pytest.Config) -> RunConfig:
    """CLI > ini > defaults. An invalid value is a usage error listing the valid choices."""
    values: dict[str, Any] = {}
    for name, _, _, choices in _OPTIONS:
        v = _value(config, name)
        if v is not None and choices is not None and v not in choices:
            flag = f"--quantvla-{name.replace('_', '-')}"
            raise pytest.UsageError(f"{flag}={v!r} is not valid; choose one of: {', '.join(choices)}")
        values[name] = v
    if values["model"] is not None:
        from quantvla import families  # imported only here: it pulls in torch

        if values["model"] not in families.names():
            raise pytest.UsageError(f"--quantvla-model={values['model']!r} is not valid; choose one of: "
                                    f"{', '.join(families.names())}")
    device = values["device"]
    if not (device == "cpu" or device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())):
        raise pytest.UsageError(f"--quantvla-device={device!r} is not valid; use cpu, cuda or cuda:N")
    if device != "cpu":
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.startswith("cuda:") and int(device[5:]) >= count):
            raise pytest.UsageError(f"--quantvla-device={device!r}: no CUDA device {device[5:] or ''} on this machine "
                                    f"({count} visible); run with --quantvla-device=cpu")
    try:
        seed = int(values["seed"])
    except ValueError:
        raise pytest.UsageError(f"--quantvla-seed={values['seed']!r} is not an integer") from None
    checkpoint = Path(values["checkpoint"]) if values["checkpoint"] else None
    if checkpoint is not None and not checkpoint.exists():
        raise pytest.UsageError(f"--quantvla-checkpoint={checkpoint} does not exist; pass a .safetensors file or a "
                                "checkpoint folder")
    if checkpoint is not None and values["config"] in TRAINED and not _is_policy_folder(checkpoint):
        raise pytest.UsageError(f"--quantvla-checkpoint={checkpoint} is not a trained-policy folder (no policy.json), "
                                f"and --quantvla-config is {values['config']}; for a model checkpoint (safetensors "
                                "file or folder) pass --quantvla-config=tiny or --quantvla-config=full, the size it "
                                "was saved at")
    episodes, margin = _episodes(values["episodes"]), _margin(values["margin"])
    suites = None
    if values["suites"] is not None:
        suites = tuple(x.strip() for x in values["suites"].split(",") if x.strip())
    bad = [x for x in suites or () if x not in SUITES]
    if bad or suites == ():
        raise pytest.UsageError(f"--quantvla-suites={values['suites']!r} is not valid; pass a comma-separated "
                                f"list of: {', '.join(SUITES)}")
    _check_outputs(values, bool(_value(config, "update_golden")))
    bits = _bits_of(values["quantizer"] or "quantvla", values["bits"]) if values["model"] else \
        values["bits"] or DEFAULT_BITS
    return RunConfig(values["model"], values["config"], bits, device, seed,
                     values["quantizer"] or "quantvla", checkpoint, _path_or_none(values["golden_dir"]),
                     bool(_value(config, "update_golden")), _path_or_none(values["report"]), episodes, suites, margin,
                     _path_or_none(values["record"]), bool(_value(config, "allow_inconclusive")), Path(config.rootpath),
                     values["forward"] or "eager")


def _path_or_none(value: str | None) -> Path | None:
    return Path(value) if value else None


def _bits_of(quantizer: str, bits: str | None) -> str:
    """One bit-width per run. A quantizer that declares its own (a preset, or a third-party callable
    with a `bits` attribute) runs at it: it wins over the default, and a different --quantvla-bits
    (command line or ini) is a usage error naming both, else the run id would claim what did not run."""
    from pytest_quantvla.quantizers import is_reference, resolve  # imported only here: they pull in torch
    from quantvla.quantizer import declared_bits

    try:
        own = declared_bits(resolve(quantizer))
    except ValueError as err:
        raise pytest.UsageError(f"--quantvla-quantizer={quantizer}: {err}") from None
    if own is None:
        if is_reference(quantizer) and bits in WEIGHT_ONLY:
            raise pytest.UsageError(f"--quantvla-bits={bits} is weight-only; the reference quantizer '{quantizer}' "
                                    "quantizes activations too: use w4a8, w4a4 or w8a8, or a third-party quantizer")
        return bits or DEFAULT_BITS
    if bits is not None and bits != own:
        raise pytest.UsageError(f"--quantvla-quantizer={quantizer} quantizes at {own}, but --quantvla-bits={bits}; "
                                f"drop --quantvla-bits (the quantizer's {own} is used) or pass --quantvla-bits={own}")
    return own


def _is_policy_folder(path: Path) -> bool:
    from quantvla.policy.bundle import is_bundle  # imported only here: it pulls in torch
    return is_bundle(path)


def _episodes(raw: str) -> int:
    from quantvla.eval.gate import parse_pairs
    try:
        return parse_pairs(raw)
    except ValueError as err:
        raise pytest.UsageError(f"--quantvla-episodes={err}") from None


def _margin(raw: str) -> float:
    from quantvla.eval.gate import parse_margin
    try:
        return parse_margin(raw)
    except ValueError as err:
        raise pytest.UsageError(f"--quantvla-margin={err}") from None


def _check_outputs(values: dict[str, Any], update_golden: bool) -> None:
    """Every path the run will write, checked before anything is built, so no result is lost at the end."""
    if values["report"]:
        report = Path(values["report"])
        if report.is_dir():
            raise pytest.UsageError(f"--quantvla-report={report} is a directory; pass a file path such as "
                                    f"{report / 'quantvla.json'}")
        if not report.parent.is_dir():
            raise pytest.UsageError(f"--quantvla-report={report}: its folder {report.parent} does not exist; "
                                    "create it first")
        _check_writable("--quantvla-report", report.parent)
    for name, wanted in (("record", True), ("golden_dir", update_golden)):
        if not (wanted and values[name]):
            continue
        folder, flag = Path(values[name]), f"--quantvla-{name.replace('_', '-')}"
        if folder.exists() and not folder.is_dir():
            raise pytest.UsageError(f"{flag}={folder} is a file, not a folder; pass a folder (it is created if "
                                    "missing)")
        _check_writable(flag, folder)


def _check_writable(flag: str, folder: Path) -> None:
    """The folder, or the nearest existing one mkdir would create it in, takes a new file. A real
    probe: permission bits say nothing for root, nor on read-only or special file systems."""
    existing = next(p for p in (folder.absolute(), *folder.absolute().parents) if p.exists())
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as err:
        raise pytest.UsageError(f"{flag}={folder}: cannot write in {existing} ({err.strerror}); pass a folder you "
                                "can write to") from None
