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
    teacher, _ = _teacher([f"teacher.pretrained={path}", "teacher.quick_gelu=false", TINY_CLIP])
    for key, value in model.visual.state_dict().items():
        assert torch.equal(teacher.tower.state_dict()[key], value), key


def _activations(tower: torch.nn.Module) -> set[str]:
    return {type(block.mlp.gelu).__name__ for block in tower.transformer.resblocks}


def test_activation_follows_the_weights_on_every_path(tmp_path, monkeypatch):
    """The OpenAI tag's weights (QuickGELU) build the same module whether the tag resolves to the HF cache, to
    open_clip's ~/.cache/clip download, or the file is named directly with teacher.quick_gelu: true."""
    import huggingface_hub

    torch.manual_seed(2)
    weights = open_clip.create_model("ViT-B-16", pretrained=None, quick_gelu=True, **TINY_ARGS).state_dict()
    tag_cfg = open_clip.get_pretrained_cfg("ViT-B-16", "openai")
    assert tag_cfg["quick_gelu"] is True  # open_clip's own metadata for the OpenAI weights
    repo = tag_cfg["hf_hub"].strip("/")
    snapshot = tmp_path / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    torch.save(weights, snapshot / "open_clip_pytorch_model.bin")
    clip_cache = tmp_path / "home" / ".cache" / "clip"
    clip_cache.mkdir(parents=True)
    torch.save(weights, clip_cache / tag_cfg["url"].rsplit("/", 1)[-1])
    local = tmp_path / "openai_b16.bin"
    torch.save(weights, local)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    from_hf_cache, _ = _teacher(["teacher.pretrained=openai", TINY_CLIP])
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    from_clip_cache, _ = _teacher(["teacher.pretrained=openai", "teacher.quick_gelu=true", TINY_CLIP])
    from_file, _ = _teacher([f"teacher.pretrained={local}", "teacher.quick_gelu=true", TINY_CLIP])
    image = torch.randn(2, 3, 32, 32)
    reference = from_file(image).levels[0]
    for teacher in (from_hf_cache, from_clip_cache, from_file):
        assert _activations(teacher.tower) == {"QuickGELU"}
        torch.testing.assert_close(teacher(image).levels[0], reference, rtol=0, atol=0)
    gelu, _ = _teacher([f"teacher.pretrained={local}", "teacher.quick_gelu=false", TINY_CLIP])
    assert _activations(gelu.tower) == {"GELU"}
    assert not torch.allclose(gelu(image).levels[0], reference)  # the activation really changes the targets


def test_activation_mismatch_and_silence_are_errors(tmp_path):
    path = tmp_path / "clip.bin"
    torch.save(open_clip.create_model("ViT-B-16", pretrained=None, **TINY_ARGS).state_dict(), path)
    with pytest.raises(ConfigError, match="local file.*set teacher.quick_gelu: true for OpenAI"):
        _teacher([f"teacher.pretrained={path}", TINY_CLIP])
    with pytest.raises(ConfigError, match="teacher.quick_gelu=False contradicts the pretrained tag 'openai'"):
        _teacher(["teacher.pretrained=openai", "teacher.quick_gelu=false", TINY_CLIP])
    cfg = load_config(None, ["teacher.name=ViT-B-16-quickgelu", "teacher.quick_gelu=false"])
    with pytest.raises(ConfigError, match="contradicts the model name 'ViT-B-16-quickgelu'"):
        teachers.open_clip_quick_gelu(cfg.teacher, None)


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
