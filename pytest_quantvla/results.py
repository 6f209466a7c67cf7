"""What a built-in check measured, as a typed result that renders its own summary-table row and
its JSON. A result travels from the process that ran the check to the one that reports (xdist) as
a plain dict tagged with its `kind` (pytest's user_properties), and is rebuilt from it there.

Where a number in the summary table comes from: the row is CheckResult.row() of the result class,
defined beside the check that fills it in (pytest_quantvla/checks/<check>.py), which measured it
through the library call named in that check."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

_KINDS: dict[str, type[CheckResult]] = {}
# keys the reporter adds to a check's entry: not measurements
_ENTRY_KEYS = ("kind", "outcome", "message")


@dataclass(kw_only=True)
class CheckResult:
    """Subclasses: a dataclass with `kind` and the fields their row shows; any further
    measurements go in `extra` and appear flat in the JSON beside the fields."""

    kind: ClassVar[str] = ""
    source: ClassVar[str] = "-"  # where the reference the check holds the measurement to comes from
    extra: dict[str, Any] = field(default_factory=dict)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind:
            _KINDS[cls.kind] = cls

    def measured(self) -> str:
        raise NotImplementedError

    def reference(self) -> str:
        raise NotImplementedError

    def row(self, name: str, verdict: str) -> list[str]:
        return [name, self.measured(), self.reference(), self.source, verdict]

    def to_dict(self) -> dict[str, Any]:
        own = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {"kind": self.kind, **self.extra, **own}

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> Self:
        """This result from a flat dict of measurements: its fields, the rest as `extra`."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(**{k: values[k] for k in names}, extra={k: v for k, v in values.items() if k not in names})

    @staticmethod
    def from_dict(entry: dict[str, Any]) -> CheckResult | None:
        """The result a reported entry holds, or None (a failed check measured nothing)."""
        cls = _KINDS.get(entry.get("kind", ""))
        if cls is None or not {f.name for f in dataclasses.fields(cls)} - {"extra"} <= entry.keys():
            return None
        result: CheckResult = cls.from_values({k: v for k, v in entry.items() if k not in _ENTRY_KEYS})
        return result
