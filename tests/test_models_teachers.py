"""Frozen teachers: output selection, dtype/device handling, and fast clear errors when weights are missing."""

from __future__ import annotations

import time

import open_clip
import pytest
import torch

from mimscale.config import ConfigError, load_config
from mimscale.models import teachers
from mimscale.models.teachers import build_teacher, resize_token_map

TINY_ARGS = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}
TINY_CLIP = (
    "teacher.model_args={embed_dim: 32, vision_cfg: {image_size: 32, layers: 3, width: 64, patch_size: 8, "
    "head_width: 32}, text_cfg: {context_length: 8, vocab_size: 64, width: 32, heads: 2, layers: 1}}"
)
CLIP = ["method.name=maskdistill", "teacher.kind=open_clip", "teacher.name=ViT-B-16"]


def _teacher(extra, output="block"):
    cfg = load_config(None, CLIP + extra)
    torch.manual_seed(0)
    return build_teacher(cfg.teacher, output, cfg.data), cfg


def test_open_clip_levels_match_open_clip_intermediates():
    teacher, _ = _teacher(["teacher.random_init=true", TINY_CLIP, "teacher.layers=[0, -1]"], output="norm")
    teacher.data_mean, teacher.data_std = teacher.teacher_mean, teacher.teacher_std  # feed images unchanged
    image = torch.randn(2, 3, 32, 32)
    out = teacher(image)
    reference = teacher.tower.forward_intermediates(image, indices=[0, 2], normalize_intermediates=True)
    for ours, theirs in zip(out.levels, reference["image_intermediates"], strict=True):
        torch.testing.assert_close(ours, theirs.permute(0, 2, 3, 1))


def test_projected_output_and_class_attention():
    teacher, _ = _teacher(["teacher.random_init=true", TINY_CLIP], output="projected")
    out = teacher(torch.randn(2, 3, 64, 64), need_cls_attention=True)  # resized to the teacher's 32 px
    assert out.levels[0].shape == (2, 4, 4, 32) and teacher.out_dim == 32
    assert out.cls_attention.shape == (2, 4, 4)
    assert torch.all(out.cls_attention > 0) and torch.all(out.cls_attention.sum((1, 2)) < 1.0)


def test_teacher_stays_frozen_in_eval_and_follows_its_own_dtype():
    teacher, _ = _teacher(["teacher.random_init=true", TINY_CLIP])
    teacher.train()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    teacher.to(torch.bfloat16)
    out = teacher(torch.randn(1, 3, 32, 32, requires_grad=True))
    assert out.levels[0].dtype == torch.bfloat16 and not out.levels[0].requires_grad


def test_local_weights_file_is_loaded(tmp_path):
    torch.manual_seed(1)
    model = open_clip.create_model("ViT-B-16", pretrained=None, **TINY_ARGS)
    path = tmp_path / "tiny_clip.bin"
    torch.save(model.state_dict(), path)
    teacher, _ = _teacher([f"teacher.pretrained={path}", TINY_CLIP])
    for key, value in model.visual.state_dict().items():
        assert torch.equal(teacher.tower.state_dict()[key], value), key


def test_missing_weights_file_names_the_key():
    with pytest.raises(ConfigError, match="teacher.pretrained=.*no such weights file"):
        _teacher(["teacher.pretrained=/nowhere/clip.bin"])


@pytest.mark.parametrize("offline_env", [True, False], ids=["HF_HUB_OFFLINE", "unreachable"])
def test_uncached_pretrained_tag_fails_fast_offline(monkeypatch, tmp_path, offline_env):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # nothing cached
    monkeypatch.setattr(teachers, "_cached_open_clip_weights", lambda name, tag: (None, {"hf_hub": "x/y/"}))
    if offline_env:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

        def unreachable(*args, **kwargs):
            raise OSError("network is unreachable")

        monkeypatch.setattr(teachers.socket, "create_connection", unreachable)
    start = time.monotonic()
    with pytest.raises(ConfigError, match="set teacher.pretrained to the local file"):
        _teacher(["teacher.pretrained=openai"])
    assert time.monotonic() - start < 5


def test_unknown_tag_and_missing_choice_are_clear():
    with pytest.raises(ConfigError, match="not an open_clip tag for ViT-B-16"):
        _teacher(["teacher.pretrained=no_such_tag"])
    with pytest.raises(ConfigError, match="teacher.pretrained is empty"):
        _teacher([])


def test_resize_token_map_keeps_a_constant_map():
    tokens = torch.ones(1, 16, 16, 3) * 2.5
    resized = resize_token_map(tokens, (14, 14))
    assert resized.shape == (1, 14, 14, 3) and torch.allclose(resized, torch.full_like(resized, 2.5))
