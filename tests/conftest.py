"""Hypothesis profiles, one thread per test process, and the slow tier.

Hypothesis: "fast" (the default, 50 examples per property), "ci" (200: .ci/run reruns every
property, marker `property`, with it) and "thorough" (2000); select with
--hypothesis-profile=NAME. No deadline: shared CI cores are noisy.

Threads: under xdist every worker, and every subprocess a test starts (pytester runs of the
plugin, the CLI), uses one intra-op thread. With torch's default (one thread per core) two
workers on two cores run four spinning OpenMP threads, which made the suite several times slower.

Slow tier (`-m slow`, run by .ci/run as a second step): real LIBERO episodes (marker `libero`)
and pytester runs of whole main jobs (marked `slow` where they are defined)."""

import os

import pytest
from hypothesis import HealthCheck, settings

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("fast", max_examples=50, derandomize=True, **_common)
settings.register_profile("ci", max_examples=200, derandomize=True, **_common)
settings.register_profile("thorough", max_examples=2000, **_common)
settings.load_profile("fast")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: minutes of CPU (real LIBERO episodes, whole main jobs); "
                                       ".ci/run runs them as a second step")
    config.addinivalue_line("markers", "property: a Hypothesis property (set here); .ci/run reruns them "
                                       "with --hypothesis-profile=ci")
    if hasattr(config, "workerinput"):
        import torch

        torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("libero") is not None:
            item.add_marker(pytest.mark.slow)
        if getattr(getattr(item, "obj", None), "is_hypothesis_test", False):
            item.add_marker(pytest.mark.property)


def pytest_terminal_summary(terminalreporter):
    """tests/test_teeth.py's score: killed / total variants (from each test's recorded property, which
    xdist carries to the controller)."""
    verdicts = [value for rep in terminalreporter.stats.get("passed", []) + terminalreporter.stats.get("failed", [])
                if rep.when == "call" for key, value in rep.user_properties if key == "teeth"]
    if verdicts:
        terminalreporter.write_line(f"teeth: killed {verdicts.count('killed')} / {len(verdicts)} variants")


@pytest.fixture(autouse=True)
def _one_thread_per_subprocess(monkeypatch):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
