"""Fixtures for users' own tests. All read the run's options (--quantvla-*) and share the
per-process model under test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

from pytest_quantvla.options import RUN_KEY, RunConfig

if TYPE_CHECKING:
    from torch import nn

    from pytest_quantvla.subject import Subject
    from quantvla import CalibrationBuffer
    from quantvla.eval.libero import TaskEnv
    from quantvla.memory import MemoryReport


def _subject(config: pytest.Config) -> Subject:
    run = config.stash[RUN_KEY]
    if run.model is None:
        pytest.fail("this fixture needs --quantvla-model (or the quantvla_model ini key)", pytrace=False)
    from pytest_quantvla.subject import subject
    return subject(run)


@pytest.fixture(scope="session")
def quantvla_run(pytestconfig: pytest.Config) -> RunConfig:
    """The parsed --quantvla-* options."""
    return pytestconfig.stash[RUN_KEY]


@pytest.fixture(scope="session")
def quantvla_fp_model(pytestconfig: pytest.Config) -> nn.Module:
    """The floating-point model under test (seeded, or loaded from --quantvla-checkpoint)."""
    return _subject(pytestconfig).fp


@pytest.fixture(scope="session")
def quantvla_quantized_model(pytestconfig: pytest.Config) -> nn.Module:
    """The model quantized by the run's quantizer."""
    return _subject(pytestconfig).quantized


@pytest.fixture(scope="session")
def quantvla_calibration(pytestconfig: pytest.Config) -> CalibrationBuffer:
    """The calibration buffer the quantizer saw (quantvla.CalibrationBuffer)."""
    return _subject(pytestconfig).calibration


@pytest.fixture(scope="session")
def quantvla_statistics(pytestconfig: pytest.Config) -> dict[str, Any]:
    """Teacher vs quantized statistics on the held-out buffer (what the goldens hold)."""
    from pytest_quantvla.checks.golden import measure
    return measure(pytestconfig.stash[RUN_KEY])


@pytest.fixture(scope="session")
def quantvla_memory(pytestconfig: pytest.Config) -> MemoryReport:
    """quantvla.memory.MemoryReport of the quantized components."""
    from quantvla.memory import component_memory
    s = _subject(pytestconfig)
    return component_memory(s.fp, s.quantized)


@pytest.fixture
def quantvla_libero(pytestconfig: pytest.Config) -> Iterator[Callable[..., TaskEnv]]:
    """A factory of LIBERO task environments with the model's protocol, closed after the test:
    env = quantvla_libero("libero_spatial", 0); env.run_episode(init_index, policy, seed)."""
    from quantvla.eval.libero import TaskEnv
    from quantvla.eval.protocols import protocol_for

    run = pytestconfig.stash[RUN_KEY]
    protocol = protocol_for(run.model)
    opened = []

    def make(suite: str, task_id: int, **kwargs: Any) -> TaskEnv:
        env = TaskEnv(suite, task_id, protocol, **kwargs)
        opened.append(env)
        return env

    yield make
    for env in opened:
        env.close()
