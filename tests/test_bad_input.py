"""Bad input gets one clear message naming the bad value and what to do, no traceback, and nothing
already on disk lost: options are usage errors (exit 4) before any model is built; the CLI exits 2."""

import pytest
import torch

pytest_plugins = ["pytester"]


def _usage_error(pytester, *args) -> str:
    result = pytester.runpytest_subprocess("--quantvla-model=pi05", *args)
    out = result.stdout.str() + result.stderr.str()
    assert result.ret == pytest.ExitCode.USAGE_ERROR, out[-3000:]
    assert "Traceback" not in out and "quantvla: pi05" not in out  # no traceback, no model built
    return result.stderr.str()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_device_without_cuda(pytester):
    err = _usage_error(pytester, "--quantvla-device=cuda")
    assert "--quantvla-device='cuda'" in err and "no CUDA device" in err and "--quantvla-device=cpu" in err


@pytest.mark.parametrize("margin", ["2", "nan", "-0.1", "inf", "abc"])
def test_margin_outside_zero_one(pytester, margin):
    err = _usage_error(pytester, f"--quantvla-margin={margin}")
    assert f"--quantvla-margin={margin!r} is not a number in [0, 1)" in err


@pytest.mark.parametrize("episodes", ["abc", "-1", "0"])
def test_episodes_not_a_positive_integer(pytester, episodes):
    err = _usage_error(pytester, f"--quantvla-episodes={episodes}")
    assert f"--quantvla-episodes={episodes!r}" in err and "positive integer" in err
    assert "suites" not in err  # the message names what was passed, not an option that was not


def test_report_path_is_a_directory(pytester):
    folder = pytester.mkdir("reports")
    (folder / "keep.txt").write_text("keep")
    err = _usage_error(pytester, f"--quantvla-report={folder}")
    assert f"--quantvla-report={folder}" in err and "is a directory" in err
    assert (folder / "keep.txt").read_text() == "keep"


def test_report_folder_missing(pytester):
    err = _usage_error(pytester, f"--quantvla-report={pytester.path / 'nope' / 'r.json'}")
    assert "does not exist" in err


def test_record_path_is_a_file(pytester):
    file = pytester.path / "gifs"
    file.write_text("not a folder")
    err = _usage_error(pytester, f"--quantvla-record={file}")
    assert f"--quantvla-record={file}" in err and "is a file" in err
    assert file.read_text() == "not a folder"


def test_golden_dir_is_a_file_with_update(pytester):
    file = pytester.path / "goldens"
    file.write_text("not a folder")
    err = _usage_error(pytester, f"--quantvla-golden-dir={file}", "--quantvla-update-golden")
    assert f"--quantvla-golden-dir={file}" in err and "is a file" in err
    assert file.read_text() == "not a folder"


def test_golden_dir_that_cannot_be_written_with_update(pytester):
    """/proc/self takes no new files, for root too (whose permission bits always say yes)."""
    err = _usage_error(pytester, "--quantvla-golden-dir=/proc/self/goldens", "--quantvla-update-golden")
    assert "--quantvla-golden-dir=/proc/self/goldens: cannot write in /proc/self" in err


def test_report_folder_that_cannot_be_written(pytester):
    err = _usage_error(pytester, "--quantvla-report=/proc/self/report.json")
    assert "--quantvla-report: " not in err and "cannot write in /proc/self" in err


def test_a_model_checkpoint_with_the_trained_config(pytester):
    """A safetensors checkpoint (openpi or LeRobot layout) is a model, not a trained-policy folder."""
    folder = pytester.mkdir("openpi_checkpoint")
    (folder / "model.safetensors").write_bytes(b"")
    err = _usage_error(pytester, f"--quantvla-checkpoint={folder}")
    assert "is not a trained-policy folder" in err and "--quantvla-config=tiny or --quantvla-config=full" in err


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["serial", "xdist"])
def test_libero_suite_the_trained_policy_does_not_know(pytester, workers):
    """Was: exit 5 'no tests ran' under xdist (the workers' usage error was swallowed)."""
    err = _usage_error(pytester, "-m", "libero", "--quantvla-episodes=20", "--quantvla-suites=libero_spatial",
                       *workers)
    assert "knows only libero_object" in err and "--quantvla-suites=libero_object" in err


def test_not_libero_collects_no_pairs():
    from pytest_quantvla.plugin import selects_libero
    assert selects_libero("libero") and selects_libero("libero and not gpu") and selects_libero("slow or libero")
    assert not selects_libero("") and not selects_libero("not libero") and not selects_libero("not slow")
    assert not selects_libero("gpu")


QUANTIZERS = '''
import copy
import math


def returns_none(fp, calibration, bits):
    return None


def returns_42(fp, calibration, bits):
    return 42


def nan_actions(fp, calibration, bits):
    """A broken quantizer: every weight NaN, so every action chunk is NaN."""
    model = copy.deepcopy(fp)
    for p in model.parameters():
        p.data.fill_(math.nan)
    return model
'''


@pytest.mark.parametrize("name,shown", [("returns_none", "returned NoneType ('None')"),
                                        ("returns_42", "returned int ('42')")])
def test_a_quantizer_that_returns_no_model(pytester, name, shown):
    pytester.makepyfile(bad_quantizers=QUANTIZERS)
    result = pytester.runpytest_subprocess("--quantvla-model=pi05", f"--quantvla-quantizer=bad_quantizers:{name}")
    out = result.stdout.str() + result.stderr.str()
    assert result.ret == pytest.ExitCode.TESTS_FAILED, out[-3000:]
    assert f"the quantizer 'bad_quantizers:{name}' {shown}, not a model" in out
    assert "AttributeError" not in out and "Traceback" not in out


def test_atomic_writes_keep_the_mode_of_what_they_replace(tmp_path):
    import os

    from quantvla.io import write_text_atomic
    new = write_text_atomic(tmp_path / "new.json", "{}")
    umask = os.umask(0o022)
    os.umask(umask)
    assert new.stat().st_mode & 0o777 == 0o666 & ~umask  # what open() gives, not mkstemp's 0600
    shared = tmp_path / "shared.json"
    shared.write_text("old")
    shared.chmod(0o664)
    write_text_atomic(shared, "new")
    assert shared.stat().st_mode & 0o777 == 0o664 and shared.read_text() == "new"


@pytest.mark.parametrize("preset", ["quantvla-w4a8", "rtn-w4a8", "smoothquant-w8a8"])
@pytest.mark.parametrize("where", ["images", "noise"])
def test_a_calibration_buffer_with_nan_names_the_entry(preset, where):
    from quantvla import CalibrationBuffer, quantize
    from quantvla.errors import QuantInputError
    from quantvla.models import build

    fp = build("pi05", "tiny")
    calibration = CalibrationBuffer.synthetic(fp, 3, seed=0)
    bad = calibration.noise[2] if where == "noise" else calibration.inputs[2].images
    bad.view(-1)[5] = float("nan")
    with pytest.raises(QuantInputError, match=f"calibration entry 2: its {where} holds 1 non-finite values"):
        quantize(fp, calibration, preset)


@pytest.mark.parametrize("flag,value,shown", [("--margin", "2", "'2' is not a number in [0, 1)"),
                                              ("--margin", "nan", "'nan' is not a number in [0, 1)"),
                                              ("--episodes", "-1", "'-1' is not a positive integer"),
                                              ("--episodes", "abc", "'abc' is not a positive integer")])
def test_cli_libero_margin_and_episodes(tmp_path, flag, value, shown):
    import subprocess
    import sys
    out = tmp_path / "report.json"
    run = subprocess.run([sys.executable, "-m", "quantvla", "libero", "--model", "pi05", flag, value, "--json",
                          str(out)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and shown in run.stderr and "Traceback" not in run.stderr
    assert not out.exists()


def test_cli_libero_json_path_is_a_directory(tmp_path):
    import subprocess
    import sys
    (tmp_path / "keep.txt").write_text("keep")
    run = subprocess.run([sys.executable, "-m", "quantvla", "libero", "--model", "pi05", "--json", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "is a directory" in run.stderr and "Traceback" not in run.stderr
    assert (tmp_path / "keep.txt").read_text() == "keep"


@pytest.mark.libero
@pytest.mark.parametrize("model", ["pi05", "gr00t-n15"])
def test_a_quantizer_with_nan_actions_fails_the_libero_gate(pytester, model):
    """Was exit 0 ("INCONCLUSIVE ... 10 episodes errored"): a broken quantizer gave a green CI. The
    pair items themselves pass (the episodes ran); the gate fails the run."""
    pytest.importorskip("libero.libero", reason="needs the libero extra")
    pytester.makepyfile(bad_quantizers=QUANTIZERS)
    result = pytester.runpytest_subprocess(f"--quantvla-model={model}", "-m", "libero", "-n", "2",
                                           "--quantvla-quantizer=bad_quantizers:nan_actions", "--quantvla-episodes=4")
    out = result.stdout.str()
    assert result.ret == pytest.ExitCode.TESTS_FAILED, out[-3000:]
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(["LIBERO gate libero_object: FAIL over 4 pairs*quantized policy errored in 4 pairs "
                                 "where FP did not*"])


@pytest.mark.libero
def test_ctrl_c_during_cli_libero_leaves_a_partial_report(tmp_path):
    import json
    import os
    import re
    import signal
    import subprocess
    import sys
    pytest.importorskip("libero.libero", reason="needs the libero extra")
    out = tmp_path / "report.json"
    proc = subprocess.Popen([sys.executable, "-m", "quantvla", "libero", "--model", "pi05", "--episodes", "20",
                             "--max-steps", "5", "--json", str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:  # wait for the first finished pair
        if re.match(r"\s+libero_spatial task \d+ init \d+:", line):
            break
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 130, output[-2000:]
    assert "Traceback" not in output and f"interrupted: partial report in {out}" in output
    report = json.loads(out.read_text())  # valid JSON, and it says what it is
    assert report["partial"] is True and 1 <= len(report["episodes"]) < 20


def test_an_embodiment_id_outside_the_action_head_is_one_clear_error():
    import dataclasses

    from quantvla.errors import QuantInputError
    from quantvla.models.gr00t_n15 import TINY
    with pytest.raises(QuantInputError, match=r"embodiment_id=31 is outside the 4 embodiments .*\(0\.\.3\)"):
        dataclasses.replace(TINY, num_embodiments=4)
    with pytest.raises(QuantInputError, match="embodiment_id=-1"):
        dataclasses.replace(TINY, embodiment_id=-1)
    assert dataclasses.replace(TINY, num_embodiments=4, embodiment_id=3).embodiment_id == 3


def test_gr00t_takes_lerobots_3d_state_and_names_a_wrong_shape():
    import dataclasses

    import torch

    from quantvla.errors import QuantInputError
    from quantvla.models import build
    model = build("gr00t-n15", "tiny").eval()
    inputs = model.example_inputs(batch=2, seed=0)
    assert inputs.state is not None
    noise = torch.randn(2, model.config.action_horizon, model.config.action_dim,
                        generator=torch.Generator().manual_seed(1))
    flat = model.sample_actions(inputs, noise)
    lerobot = model.sample_actions(dataclasses.replace(inputs, state=inputs.state[:, None]), noise)
    assert torch.equal(flat, lerobot)
    with pytest.raises(QuantInputError, match=r"GR00T state has shape \(2, 1, 3\); expected \[2, 16\]"):
        model.sample_actions(dataclasses.replace(inputs, state=torch.zeros(2, 1, 3)), noise)
