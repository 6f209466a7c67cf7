"""Built-in checks: plain functions over the library, each listed as a Check (id, function,
markers, result kind); each returns a typed result (pytest_quantvla.results) or raises CheckFailed."""

from __future__ import annotations

from collections.abc import Iterator

from pytest_quantvla.checks import calibration, drift, forward, golden, kernels, layers, libero, memory, transform
from pytest_quantvla.collect import Check, CheckFailed
from pytest_quantvla.options import RunConfig


def all_checks(run: RunConfig, with_libero: bool = False) -> Iterator[Check]:
    """Every built-in check; the LIBERO pairs only when asked for (-m libero): they take minutes."""
    yield from kernels.checks(run)
    yield from transform.checks(run)
    try:
        from pytest_quantvla.subject import subject
        subject(run)  # build the model and quantize it once, here, so a failure is reported once
    except Exception as err:  # noqa: BLE001 - shown to the user as one failing check, not a traceback
        message = f"could not build or quantize {run.model} ({run.size}) with {run.quantizer}: " \
                  f"{type(err).__name__}: {err}"

        def failed() -> None:
            raise CheckFailed(message)

        yield Check(f"{run.prefix}/quantize", failed, kind="quantize")
        return
    yield from forward.checks(run)
    yield from memory.checks(run)
    yield from golden.checks(run)
    yield from drift.checks(run)
    yield from calibration.checks(run)
    yield from layers.checks(run)
    if with_libero:
        yield from libero.checks(run)
