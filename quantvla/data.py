"""Where the data that ships with the project lives, found one way for every caller: reference/
(the paper's numbers, protocols, layer error limits) and golden/ (golden statistics, the trained
policies). A wheel carries them as quantvla/_data/<name>; a source checkout has them at the top."""

from __future__ import annotations

from pathlib import Path

from quantvla.errors import QuantVLAError

_PACKAGE = Path(__file__).resolve().parent


def data_dir(name: str) -> Path:
    for candidate in (_PACKAGE / "_data" / name, _PACKAGE.parent / name):
        if candidate.is_dir():
            return candidate
    raise QuantVLAError(f"the {name}/ data is missing next to the quantvla package; reinstall pytest-quantvla")
