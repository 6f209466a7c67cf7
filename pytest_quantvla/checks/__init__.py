"""Built-in checks: plain functions over the library, listed as (id, callable, markers)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from pytest_quantvla.checks import kernels, layers
from pytest_quantvla.options import RunConfig

Check = tuple[str, Callable[[], dict | None], tuple]


def all_checks(run: RunConfig) -> Iterator[Check]:
    yield from kernels.checks(run)
    yield from layers.checks(run)
