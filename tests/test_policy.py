"""Policy input/output adapters: preprocessing, tokenizers, (un)normalization."""

import numpy as np
import pytest
import torch

from quantvla.errors import QuantVLAError
from quantvla.models import build
from quantvla.policy.adapters import (
    HFTokenizer,
    LiberoAdapter,
    NormStats,
    WordTokenizer,
    libero_state,
    quat_to_axis_angle,
    resize_with_pad,
)


def _obs(seed=0):
    rng = np.random.default_rng(seed)
    return {"agentview_image": rng.integers(0, 256, (256, 256, 3), dtype=np.uint8),
            "robot0_eye_in_hand_image": rng.integers(0, 256, (256, 256, 3), dtype=np.uint8),
            "robot0_eef_pos": rng.normal(size=3), "robot0_eef_quat": np.array([0.0, 0.0, 0.0, 1.0]),
            "robot0_gripper_qpos": np.array([0.03, -0.03])}


def _stats(n=7):
    return {"actions": NormStats(np.zeros(n), np.ones(n), -np.ones(n) * 2, np.ones(n) * 2, -np.ones(n), np.ones(n)),
            "state": NormStats(np.zeros(8), np.ones(8), -np.ones(8), np.ones(8), -np.ones(8), np.ones(8))}


def test_word_tokenizer_round_trip(tmp_path):
    tok = WordTokenizer.fit(["pick up the black bowl", "open the drawer"])
    ids, mask = tok.encode("Pick up the DRAWER, please", 8)
    assert ids[0] == 1 and int(mask.sum()) == 6 and ids[5] == 2  # bos ... unknown "please"
    tok.save(tmp_path / "tok.json")
    assert torch.equal(WordTokenizer.load(tmp_path / "tok.json").encode("open the drawer", 8)[0],
                       tok.encode("open the drawer", 8)[0])


def test_real_tokenizer_without_its_package_is_a_clear_error(tmp_path, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_sentencepiece(name, *args, **kwargs):
        if name == "sentencepiece":
            raise ImportError("no", name="sentencepiece")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sentencepiece)
    with pytest.raises(QuantVLAError, match=r"needs the 'sentencepiece' package: pip install 'pytest-quantvla\[tok"):
        HFTokenizer(tmp_path / "paligemma_tokenizer.model")


def test_resize_with_pad_keeps_aspect_and_range():
    img = np.full((100, 200, 3), 255, dtype=np.uint8)
    out = resize_with_pad(img, 224)
    assert out.shape == (3, 224, 224)
    assert float(out[:, 112, 112].min()) == pytest.approx(1.0) and float(out[:, 0, 112].max()) == -1.0


def test_axis_angle_and_state():
    assert np.allclose(quat_to_axis_angle([0, 0, np.sin(np.pi / 4), np.cos(np.pi / 4)]), [0, 0, np.pi / 2])
    assert libero_state(_obs()).shape == (8,)


def test_pi05_adapter_end_to_end():
    torch.manual_seed(0)
    model = build("pi05", "tiny")
    c = model.config
    adapter = LiberoAdapter("pi05", c.vision.image, c.max_token_len, WordTokenizer(["pick", "bowl"]), _stats())
    inputs = adapter.inputs(_obs(), "pick bowl", c.num_images)
    assert inputs.images.shape == (1, c.num_images, 3, c.vision.image, c.vision.image)
    acts = adapter.actions(model.sample_actions(inputs, generator=torch.Generator().manual_seed(0)))
    assert acts.shape == (c.action_horizon, 7) and np.isfinite(acts).all()


def test_gr00t_adapter_binarizes_the_gripper_and_pads_the_state():
    torch.manual_seed(0)
    model = build("gr00t-n15", "tiny")
    c = model.config
    adapter = LiberoAdapter("gr00t-n15", c.vision.image, c.max_token_len, WordTokenizer(["open"]), _stats(),
                            action_norm="min_max", state_dim=c.state_dim)
    inputs = adapter.inputs(_obs(), "open", c.num_images)
    assert inputs.state.shape == (1, c.state_dim) and float(inputs.state[0, 8:].abs().sum()) == 0.0
    acts = adapter.actions(model.sample_actions(inputs, generator=torch.Generator().manual_seed(0)))
    assert set(np.unique(acts[:, 6])) <= {-1.0, 0.0, 1.0}


def test_quantile_unnormalize_inverts_normalize():
    s = _stats()["actions"]
    x = np.linspace(-2, 2, 7)
    assert np.allclose(s.unnormalize(s.normalize(x, "quantile"), "quantile"), x)
