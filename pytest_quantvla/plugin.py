"""The pytest11 entry point: options, markers, and the built-in checks brought into the run
when --quantvla-model is given (from any folder, nothing to copy)."""

from __future__ import annotations

import pytest

from pytest_quantvla import options
from pytest_quantvla.collect import CheckItem

MARKERS = {
    "libero": "LIBERO success-rate gates (real simulator; nightly or on demand)",
    "gpu": "needs a CUDA device (nightly GPU job)",
    "slow": "takes minutes rather than seconds",
}


def pytest_addoption(parser: pytest.Parser) -> None:
    options.add_options(parser)


def pytest_configure(config: pytest.Config) -> None:
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")
    config.stash[options.RUN_KEY] = options.parse(config)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    """Append the built-in checks before -m/-k deselection runs. Every xdist worker builds the
    same sorted list, so the controller sees identical collections."""
    run = config.stash[options.RUN_KEY]
    if run.model is None:
        return
    from pytest_quantvla.checks import all_checks

    built = []
    for name, check, markers in sorted(all_checks(run), key=lambda c: c[0]):
        built.append(CheckItem.from_parent(session, name=name, nodeid=name, check=check, markers=markers))
    items.extend(built)
