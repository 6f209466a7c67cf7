"""The built-in checks as pytest Items, with readable ids like quantvla/<model>/w4a8/kernel_exact[cpu-w4]."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from _pytest._code.code import TerminalRepr, TracebackStyle

from pytest_quantvla.results import CheckResult
from quantvla.errors import QuantVLAError


class Check(NamedTuple):
    """A built-in check: its test id, the function that runs it (returns a CheckResult, or raises
    CheckFailed), its markers, the kind of result it makes and what identifies it within that kind
    (a LIBERO pair's suite, task and init): both are reported even when the check fails."""

    name: str
    run: Callable[[], CheckResult | None]
    markers: tuple[Any, ...] = ()
    kind: str = ""
    identity: dict[str, Any] = {}  # noqa: RUF012 - never mutated


class CheckFailed(AssertionError):
    """A built-in check's verdict: the message says what was measured against what."""


class CheckItem(pytest.Item):
    def __init__(self, *, check: Check, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.check = check
        for mark in check.markers:
            self.add_marker(mark)

    def runtest(self) -> None:
        # what the check is, first: a failing check's report carries it too
        self.user_properties.append(("kind", self.check.kind))
        self.user_properties.extend(self.check.identity.items())
        result = self.check.run()
        if result is not None:
            self.user_properties.extend(result.to_dict().items())

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException],
                     style: TracebackStyle | None = None) -> str | TerminalRepr:
        from pytest_quantvla.golden import GoldenError

        if isinstance(excinfo.value, (CheckFailed, QuantVLAError, GoldenError)):
            return f"{self.name}: {excinfo.value}"
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self) -> tuple[Path, None, str]:
        return self.path, None, self.name
