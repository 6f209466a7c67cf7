"""The model-family registry: a family registered in one place is accepted by the plugin, the
CLI and the library (a toy third family runs the main job end to end)."""

import dataclasses
import json

import pytest

from quantvla import families
from quantvla.errors import QuantVLAError

pytest_plugins = ["pytester"]

TOY_CONFTEST = '''
from quantvla import families
from quantvla.models import pi05


class ToyVLA(pi05.PI05):
    """A third family for the test: pi0.5's architecture under another name and registry record."""
    family = "toy-vla"


families.register(families.Family(
    name="toy-vla", model=ToyVLA, configs={"tiny": pi05.TINY, "full": pi05.TINY}, layouts=pi05.LAYOUTS,
    protocol="openpi", action_norm="quantile", gripper="signed", flow="noise_at_one"), replace=True)
'''


def test_built_in_families_are_registered_with_their_facts():
    assert families.names() == ("pi05", "gr00t-n15")
    gr00t = families.get("gr00t-n15")
    assert (gr00t.protocol, gr00t.gripper, gr00t.image_crop, gr00t.native_layout) == ("gr00t", "unit", 0.95, "isaac")
    assert families.of(families.build("pi05", "tiny")).name == "pi05"


def test_each_shipped_policy_subject_loads_the_policy_it_names():
    """"trained" is the policy that sees where one ships (GR00T N1.5), "trained-state" the state-based
    stand-in; both load with their own recorded calibration."""
    seen = {}
    for name in families.names():
        for size in families.TRAINED:
            loaded = families.load_fp(name, size)
            seen[name, size] = (loaded.bundle.path.name, loaded.bundle.sees)
            assert len(loaded.calibration) > 0
    assert seen == {("pi05", "trained"): ("pi05-tiny-vision", True),
                    ("pi05", "trained-state"): ("pi05-tiny-state", False),
                    ("gr00t-n15", "trained"): ("gr00t-n15-tiny-vision", True),
                    ("gr00t-n15", "trained-state"): ("gr00t-n15-tiny-state", False)}
    from quantvla.policy.bundle import shipped_policy

    pi05 = families.get("pi05")
    families.register(dataclasses.replace(pi05, name="toy", policies={},
                                          model=type("Toy", (pi05.model,), {"family": "toy"})))
    try:
        with pytest.raises(QuantVLAError, match="no 'trained' policy ships for toy; pass a policy folder"):
            shipped_policy("toy")
    finally:
        families.unregister("toy")


def test_an_unknown_family_or_a_mislabelled_model_is_one_clear_error():
    with pytest.raises(QuantVLAError, match="unknown model 'pi06'; choose one of: pi05, gr00t-n15"):
        families.get("pi06")
    pi05 = families.get("pi05")
    with pytest.raises(QuantVLAError, match="registered already"):
        families.register(pi05)
    import dataclasses
    with pytest.raises(QuantVLAError, match="PI05.family must be 'other'"):
        families.register(dataclasses.replace(pi05, name="other"))
    assert "other" not in families.names()


def test_the_plugin_lists_the_registered_families_for_an_unknown_model(pytester):
    result = pytester.runpytest_subprocess("--quantvla-model=pi06")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--quantvla-model='pi06' is not valid; choose one of: pi05, gr00t-n15*"])


@pytest.mark.slow  # two main jobs
def test_a_third_family_registered_in_one_place_runs_the_main_job(pytester):
    pytester.makeconftest(TOY_CONFTEST)
    golden = pytester.path / "goldens"
    common = ["--quantvla-model=toy-vla", "--quantvla-config=tiny", f"--quantvla-golden-dir={golden}", "-p",
              "no:cacheprovider"]
    first = pytester.runpytest_subprocess(*common, "--quantvla-update-golden", "-k", "golden_statistics")
    assert first.ret == pytest.ExitCode.OK, first.stdout.str()[-3000:]
    recorded = json.loads((golden / "toy-vla-tiny-quantvla-w4a8.json").read_text())
    assert recorded["model"] == "toy-vla" and recorded["quantvla_version"]
    second = pytester.runpytest_subprocess(*common, "--quantvla-report=report.json")
    assert second.ret == pytest.ExitCode.OK, second.stdout.str()[-3000:]
    report = json.loads((pytester.path / "report.json").read_text())
    kinds = {c["kind"] for c in report["checks"].values() if c["outcome"] == "passed"}
    assert {"kernel_exact", "memory", "golden_statistics", "attention_drift", "layer_bounds", "outlier_layer",
            "calibration_recovery"} <= kinds
    assert all(k.startswith("quantvla/toy-vla/w4a8/") for k in report["checks"])
    assert report["quantvla_version"]
