"""The built-in checks as pytest Items, with readable ids like quantvla/pi05/w4a8/kernel_exact[cpu-w4]."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from quantvla.errors import QuantVLAError


class CheckFailed(AssertionError):
    """A built-in check's verdict: the message says what was measured against what."""


class CheckItem(pytest.Item):
    def __init__(self, *, check: Callable[[], dict | None], markers=(), **kwargs):
        super().__init__(**kwargs)
        self.check = check
        for mark in markers:
            self.add_marker(mark)

    def runtest(self) -> None:
        measured = self.check()
        for key, value in (measured or {}).items():
            self.user_properties.append((key, value))

    def repr_failure(self, excinfo, style=None):
        from pytest_quantvla.golden import GoldenError

        if isinstance(excinfo.value, (CheckFailed, QuantVLAError, GoldenError)):
            return f"{self.name}: {excinfo.value}"
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self):
        return self.path, None, self.name
