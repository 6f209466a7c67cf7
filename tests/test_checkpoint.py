"""Checkpoints in every real layout load and give identical actions; every corruption gives one
clear CheckpointError."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantvla.models import build
from quantvla.models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

CASES = [("pi05", "openpi", None), ("pi05", "lerobot", None), ("pi05", "openpi", 200_000),
         ("gr00t-n15", "isaac", None), ("gr00t-n15", "isaac", 300_000), ("gr00t-n15", "lerobot", None)]


def _pair(family):
    torch.manual_seed(0)
    src = build(family, "tiny")
    torch.manual_seed(1)
    dst = build(family, "tiny")
    return src, dst


def _actions(model):
    inputs = model.example_inputs(seed=7)
    noise = torch.randn(1, model.config.action_horizon, model.config.action_dim,
                        generator=torch.Generator().manual_seed(3))
    return model.sample_actions(inputs, noise)


@pytest.mark.parametrize("family, layout, shard", CASES)
def test_layouts_round_trip_to_identical_actions(tmp_path, family, layout, shard):
    src, dst = _pair(family)
    out = save_checkpoint(src, tmp_path / "ckpt", layout, shard_bytes=shard)
    if shard:
        assert (out / "model.safetensors.index.json").is_file()
        assert len(list(out.glob("model-*.safetensors"))) > 1
    assert not torch.equal(_actions(src), _actions(dst))
    lay = load_checkpoint(dst, out)
    assert lay.name == layout
    assert torch.equal(_actions(src), _actions(dst))


def test_openpi_layout_stores_the_tied_embedding_as_lm_head_and_tolerates_the_unused_expert_head(tmp_path):
    src, dst = _pair("pi05")
    out = save_checkpoint(src, tmp_path / "ckpt", "openpi")
    tensors = load_file(out / "model.safetensors")
    assert "paligemma_with_expert.paligemma.lm_head.weight" in tensors
    assert not any(k.endswith("language_model.embed_tokens.weight") for k in tensors)
    tensors["paligemma_with_expert.gemma_expert.lm_head.weight"] = torch.randn(512, 32)
    save_file(tensors, out / "model.safetensors")
    load_checkpoint(dst, out)
    assert torch.equal(_actions(src), _actions(dst))


def _corrupt(tmp_path, edit):
    src, dst = _pair("pi05")
    out = save_checkpoint(src, tmp_path / "ckpt", "openpi")
    f = out / "model.safetensors"
    tensors = load_file(f)
    edit(tensors, f)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(dst, out)
    after = dst.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a failed load must not touch the model"
    return str(info.value)


Q = "paligemma_with_expert.paligemma.model.language_model.layers.0.self_attn.q_proj.weight"


def _save(tensors, f):
    save_file(tensors, f)


@pytest.mark.parametrize("edit, expect", [
    (lambda t, f: (t.pop(Q), _save(t, f)), ["1 missing keys", Q, "layout 'openpi'"]),
    (lambda t, f: (t.update({"extra.weight": torch.zeros(2)}), _save(t, f)), ["1 unexpected keys", "extra.weight"]),
    (lambda t, f: (t.update({Q: torch.zeros(3, 3)}), _save(t, f)), ["1 shape mismatches", "(3, 3), expected (64, 64)"]),
    (lambda t, f: (t.update({Q: torch.zeros(64, 64, dtype=torch.int8)}), _save(t, f)),
     ["1 non-float tensors", "torch.int8"]),
    (lambda t, f: (t[Q].__setitem__((0, 0), float("nan")), _save(t, f)), ["1 NaN/Inf tensors", Q]),
    (lambda t, f: f.write_bytes(f.read_bytes()[:1000]), ["truncated or not a safetensors file"]),
])
def test_each_corruption_gives_one_clear_error(tmp_path, edit, expect):
    message = _corrupt(tmp_path, edit)
    for part in expect:
        assert part in message, message


def test_many_missing_keys_are_summarised(tmp_path):
    message = _corrupt(tmp_path, lambda t, f: _save({k: v for k, v in t.items() if "vision_tower" not in k}, f))
    assert "missing keys" in message and "more)" in message


def test_sharded_index_naming_a_missing_shard(tmp_path):
    src, dst = _pair("gr00t-n15")
    out = save_checkpoint(src, tmp_path / "ckpt", "isaac", shard_bytes=300_000)
    shard = sorted(out.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match="lists shards that are not in"):
        load_checkpoint(dst, out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert shard.name in set(index["weight_map"].values())


def test_wrong_layout_or_path_is_named(tmp_path):
    _, dst = _pair("pi05")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(dst, tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="unknown layout 'isaac' for pi05"):
        save_checkpoint(dst, tmp_path / "c", "openpi")
        load_checkpoint(dst, tmp_path / "c", layout="isaac")


@pytest.mark.parametrize("prefix, layout", [("", "head"), ("action_head.", "isaac-head"),
                                            ("_groot_model.action_head.", "lerobot-head")])
def test_gr00t_action_head_only_checkpoints_load_into_the_head(tmp_path, prefix, layout):
    """The three forms real GR00T N1.5 head-only files come in (bare, Isaac-GR00T, LeRobot)."""
    src, dst = _pair("gr00t-n15")
    save_file({prefix + k: v.contiguous() for k, v in src.action_head.state_dict().items()},
              str(tmp_path / "head.safetensors"))
    backbone = {k: v.clone() for k, v in dst.backbone.state_dict().items()}
    assert load_checkpoint(dst, tmp_path / "head.safetensors").name == layout
    assert all(torch.equal(v, src.action_head.state_dict()[k]) for k, v in dst.action_head.state_dict().items())
    assert all(torch.equal(v, backbone[k]) for k, v in dst.backbone.state_dict().items())  # untouched
    features = torch.randn(2, 9, src.config.llm.width, generator=torch.Generator().manual_seed(5))
    noise = torch.randn(2, src.config.action_horizon, src.config.action_dim, generator=torch.Generator().manual_seed(6))
    state = torch.randn(2, 1, src.config.state_dim)  # LeRobot's [B, 1, state_dim]
    assert torch.equal(src.sample_actions_from_features(features, state, noise),
                       dst.sample_actions_from_features(features, state, noise))


def test_sampling_from_backbone_features_is_the_full_model_without_its_backbone():
    model = build("gr00t-n15", "tiny")
    inputs = model.example_inputs(seed=7)
    noise = torch.randn(1, model.config.action_horizon, model.config.action_dim)
    features, _ = model.backbone(inputs)
    assert torch.equal(model.sample_actions(inputs, noise),
                       model.sample_actions_from_features(features, inputs.state, noise))
    from quantvla.errors import QuantInputError
    with pytest.raises(QuantInputError, match=r"the action head takes \[batch, tokens, "):
        model.sample_actions_from_features(features[0], inputs.state, noise)


def test_a_head_only_checkpoint_missing_a_key_names_the_head_layout(tmp_path):
    src, dst = _pair("gr00t-n15")
    tensors = {"action_head." + k: v.contiguous() for k, v in src.action_head.state_dict().items()}
    tensors.pop(next(iter(tensors)))
    save_file(tensors, str(tmp_path / "head.safetensors"))
    expect = r"(?s)layout 'isaac-head'.*the action_head only.*1 missing keys: action_head\."
    with pytest.raises(CheckpointError, match=expect):
        load_checkpoint(dst, tmp_path / "head.safetensors")
