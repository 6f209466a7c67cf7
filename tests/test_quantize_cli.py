"""python -m quantvla quantize: the deployer's command writes an artifact that loads back to the
same actions, prints the memory of the quantized components, and refuses bad input in one line."""

import pytest
import torch

from quantvla.__main__ import main
from quantvla.artifact import load_quantized
from quantvla.policy.bundle import load_bundle, shipped_policy


def test_quantize_writes_an_artifact_that_loads_to_the_same_actions(tmp_path, capsys):
    out = tmp_path / "artifact"
    assert main(["quantize", "--model", "gr00t-n15", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "stored" in printed and "MiB" in printed and "saved" in printed and f"wrote {out}" in printed
    bundle = load_bundle(shipped_policy("gr00t-n15"))
    fp, calibration = bundle.model.eval(), bundle.calibration()
    loaded = load_quantized(out, source=fp, calibration=calibration)  # checks it was made from them
    from quantvla import preset, quantize

    torch.manual_seed(0)
    again = quantize(fp, calibration, preset("quantvla-w4a8"))
    x, noise = calibration.inputs[0], calibration.noise[0]
    assert torch.equal(loaded.sample_actions(x, noise), again.sample_actions(x, noise))


def test_quantize_refuses_bad_input_in_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    cases = [(["--quantizer", "nope"], "unknown quantizer preset 'nope'"),
             (["--out", str(tmp_path / "file")], "is a file; pass a folder"),
             (["--quantizer", "quantvla.thirdparty:quanto_qint8"], "a third-party quantizer saves with its own"),
             (["--checkpoint", str(tmp_path)], "is not a trained-policy folder")]
    for extra, message in cases:
        args = ["quantize", "--model", "pi05", "--out", str(tmp_path / "a"), *extra]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "a").exists()  # nothing written for refused input


def test_layers_per_pass_must_be_a_positive_integer(tmp_path, capsys):
    for bad in ("0", "-1", "1.5", "x"):
        with pytest.raises(SystemExit) as exit_info:  # argparse: usage and one error line, exit 2
            main(["quantize", "--model", "pi05", "--out", str(tmp_path / "a"), "--layers-per-pass", bad])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and f"expected a positive integer, got '{bad}'" in err
        assert "Traceback" not in err
    assert not (tmp_path / "a").exists()


def test_train_tiny_shift_must_be_zero_or_positive(tmp_path, capsys):
    for bad in ("-1", "1.5", "x"):
        with pytest.raises(SystemExit) as exit_info:
            main(["train-tiny", "--model", "pi05", "--demos", str(tmp_path / "d"), "--out", str(tmp_path / "p"),
                  "--shift", bad])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and f"expected 0 or a positive integer, got '{bad}'" in err
    assert not (tmp_path / "p").exists()
