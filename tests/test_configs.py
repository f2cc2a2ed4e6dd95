"""Every file in configs/ loads and validates; each preset builds (cheaply) as it would train."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mimscale.config import ConfigError, from_dict, load_config
from mimscale.methods import build_method
from mimscale.pipeline.masking import mask_generator_for

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
DEMOS = [p for p in CONFIGS if p.name.startswith("demo_")]
PAPER = [p for p in CONFIGS if not p.name.startswith("demo_")]
RANDOM_TEACHER = ["teacher.pretrained=", "teacher.random_init=true"]
EXPECTED = {  # method, mask kind the loader gets, student patch (token stride)
    "simmim_vit_base.yaml": ("simmim", "random_cells", 16),
    "simmim_swin_base.yaml": ("simmim", "random_cells", 4),
    "simmim_swinv2_base.yaml": ("simmim", "random_cells", 4),
    "simmim_swinv2_giant_3b.yaml": ("simmim", "random_cells", 4),
    "maskdistill_vit_base_clip_b16.yaml": ("maskdistill", "blockwise", 16),
    "maskdistill_vit_large_clip_l14.yaml": ("maskdistill", "blockwise", 16),
    "maskdistill_vit_giant_1b.yaml": ("maskdistill", "blockwise", 14),
    "maskalign_vit_base_clip_b16.yaml": ("maskalign", "random_tokens", 16),
    "relaxmim_vit_base.yaml": ("relaxmim", "random_tokens", 16),
    "mae_vit_base.yaml": ("mae", "random_tokens", 16),
    "mae_vit_large.yaml": ("mae", "random_tokens", 16),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_loads_and_validates(path):
    cfg = load_config(path)
    assert from_dict(cfg.to_dict()) == cfg  # the resolved config a checkpoint stores rebuilds the same run
    if not path.name.startswith("demo_"):
        assert "shards/sample" not in cfg.data.shards  # paper presets point at data a user edits


def test_every_paper_config_has_an_expected_preset():
    assert {p.name for p in PAPER} == set(EXPECTED)


@pytest.mark.parametrize("path", PAPER, ids=[p.name for p in PAPER])
def test_paper_preset_builds_at_full_size_on_meta(path):
    cfg = load_config(path, RANDOM_TEACHER if load_config(path).teacher.kind != "none" else [])
    with torch.device("meta"):
        method = build_method(cfg)
    name, mask_kind, stride = EXPECTED[path.name]
    assert (cfg.method.name, method.mask_kind, method.token_stride) == (name, mask_kind, stride)
    assert not {id(p) for m in method.frozen_modules() for p in m.parameters()} & {id(p) for p in method.parameters()}


@pytest.mark.parametrize(
    "name,override,low,high",
    [
        ("maskdistill_vit_giant_1b.yaml", "model.student_args.depth=2", 0.95e9, 1.1e9),
        ("simmim_swinv2_giant_3b.yaml", "model.student_args.depths=[1,1,1,1]", 2.9e9, 3.1e9),
    ],
)
def test_giant_presets_are_giant_and_build_at_reduced_depth(name, override, low, high):
    path = CONFIGS[0].parent / name
    extra = RANDOM_TEACHER if "maskdistill" in name else []
    with torch.device("meta"):
        full = build_method(load_config(path, extra))
        reduced = build_method(load_config(path, extra + [override]))
    count = sum(p.numel() for p in full.student.parameters())
    assert low < count < high, count
    assert sum(p.numel() for p in reduced.student.parameters()) < count / 4
    cfg = load_config(path)
    assert cfg.deepspeed.zero_stage == 3 and cfg.deepspeed.precision == "bf16"
    assert cfg.deepspeed.activation_checkpointing


def test_giant_vit_trains_a_step_at_depth_two():
    tiny_teacher = (
        "teacher.model_args={embed_dim: 16, vision_cfg: {image_size: 224, layers: 1, width: 32, patch_size: 14, "
        "head_width: 16}, text_cfg: {context_length: 8, vocab_size: 64, width: 16, heads: 2, layers: 1}}"
    )
    overrides = RANDOM_TEACHER + [tiny_teacher, "model.student_args.depth=1", "model.student_args.embed_dim=64"]
    overrides += ["model.student_args.num_heads=2"]
    cfg = load_config(CONFIGS[0].parent / "maskdistill_vit_giant_1b.yaml", overrides)
    torch.manual_seed(0)
    method = build_method(cfg)
    method.set_grad_checkpointing(True)
    mask = torch.zeros(2, 16, 16, dtype=torch.bool)
    mask[:, :6] = True
    out = method({"image": torch.randn(2, 3, 224, 224), "mask": mask})
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and method.student.mask_token.grad is not None


@pytest.mark.parametrize("path", DEMOS, ids=[p.name for p in DEMOS])
def test_demo_builds_and_steps(path):
    cfg = load_config(path)
    torch.manual_seed(0)
    method = build_method(cfg)
    assert 4e6 < sum(p.numel() for p in method.student.parameters()) < 7e6
    generator = mask_generator_for(cfg, method)
    rng = np.random.default_rng(0)
    mask = torch.from_numpy(np.stack([generator(rng) for _ in range(2)]))
    side = cfg.data.image_size
    out = method({"image": torch.randn(2, 3, side, side), "mask": mask})
    out["loss"].backward()
    assert torch.isfinite(out["loss"])


def test_paper_teacher_tag_fails_fast_offline():
    start = time.monotonic()
    with pytest.raises(ConfigError, match="teacher.pretrained"):
        build_method(load_config(CONFIGS[0].parent / "maskalign_vit_base_clip_b16.yaml", ["teacher.pretrained=openai"]))
    assert time.monotonic() - start < 10
