"""The suite measures its own teeth: every known-bad variant of the reference quantizer in
tests/teeth.py (monkeypatched, never an edit of the source) must fail the PR tier's built-in checks,
and the reference itself must pass them. The session summary prints "teeth: killed K / N variants"
(tests/conftest.py), under xdist as in a serial run."""

from __future__ import annotations

import pytest

from tests import teeth


@pytest.fixture
def fresh():
    teeth.kernel_state_settled()
    teeth.clear_caches()
    yield
    teeth.clear_caches()


@pytest.mark.slow  # quantizes and checks both trained policies
def test_reference_passes_every_check(fresh):
    assert teeth.first_kill() is None


@pytest.mark.slow  # one quantization and up to two PR tiers per variant
@pytest.mark.parametrize("name", list(teeth.VARIANTS))
def test_variant_fails_the_pr_tier(name, fresh, monkeypatch, record_property):
    variant = teeth.VARIANTS[name]
    monkeypatch.setattr(variant.target, variant.replacement)
    kill = teeth.first_kill()
    record_property("teeth", "killed" if kill else "survived")
    assert kill is not None, f"the {variant.area} variant {name!r} passed every built-in check of both models"
    print(f"{name}: killed by {kill[0]}: {kill[1]}")
