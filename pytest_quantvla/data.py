"""Where the plugin's goldens live: package data under pytest_quantvla/golden in a wheel, the
repository's top-level golden/ in a source checkout. (The paper's numbers: quantvla.reference.)"""

from __future__ import annotations

from pathlib import Path

_PKG = Path(__file__).resolve().parent


def data_dir(name: str) -> Path:
    packaged = _PKG / name
    return packaged if packaged.is_dir() else _PKG.parent / name

