"""Bad options are usage errors (exit 4) before any model is built: one line naming the bad value
and what to do, no traceback, and nothing already on disk touched."""

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
    assert f"--quantvla-margin={margin!r}" in err and "between 0 and 1" in err


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
