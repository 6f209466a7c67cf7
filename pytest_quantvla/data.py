"""Where the plugin's data lives: reference/ (the paper's numbers) and golden/ (goldens, small
checkpoints). In a wheel they are package data under pytest_quantvla/; in a source checkout they
are the repository's top-level folders."""

from __future__ import annotations

from pathlib import Path

_PKG = Path(__file__).resolve().parent


def data_dir(name: str) -> Path:
    packaged = _PKG / name
    return packaged if packaged.is_dir() else _PKG.parent / name


def paper() -> dict:
    from quantvla.reference import paper as library_paper
    return library_paper()
