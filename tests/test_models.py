"""Students and heads: mask-token replacement, visible-only forward cost, Swin path, head shapes."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mimscale.config import ConfigError, load_config
from mimscale.models.heads import DynamicAlignHead, LinearPixelHead, PixelShuffleHead, identity_like_mixing
from mimscale.models.students import build_student

TINY_VIT = ["model.student=vit_tiny_patch16_224", "model.student_args={patch_size: 8, depth: 2}", "data.image_size=32"]
TINY_SWIN = [
    "model.student=swin_tiny_patch4_window7_224",
    "model.student_args={embed_dim: 16, depths: [1, 1, 1, 1], num_heads: [1, 1, 1, 1], window_size: 2}",
    "data.image_size=64",
    "mask.patch_size=32",
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _student(overrides):
    torch.manual_seed(0)
    return build_student(load_config(None, overrides)).eval()


def _random_mask(batch: int, grid: int, count: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    order = torch.stack([torch.randperm(grid * grid, generator=gen) for _ in range(batch)])
    return (order < count).view(batch, grid, grid)


def test_vit_mask_token_replaces_only_masked_patch_embeddings():
    student = _student(TINY_VIT)
    image = torch.randn(2, 3, 32, 32)
    mask = _random_mask(2, 4, 6)
    captured = {}
    handle = student.backbone.norm_pre.register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0]))
    student(image, mask)
    handle.remove()
    model = student.backbone
    plain = model._pos_embed(model.patch_embed(image))[:, 1:]
    replaced = captured["x"][:, 1:]
    flat = mask.flatten(1)
    assert torch.equal(replaced[~flat], plain[~flat])
    expected = (student.mask_token[0] + model.pos_embed[0, 1:]).expand(2, -1, -1)[flat]
    torch.testing.assert_close(replaced[flat], expected)


def test_vit_state_dict_keys_are_plain_timm_keys_under_backbone():
    student = _student(TINY_VIT)
    keys = set(student.state_dict())
    assert "mask_token" in keys
    backbone_keys = {k.removeprefix("backbone.") for k in keys if k.startswith("backbone.")}
    assert backbone_keys == set(student.backbone.state_dict())
    assert "head.weight" not in backbone_keys  # num_classes=0


def test_visible_only_forward_processes_only_kept_tokens():
    student = _student(["model.student=vit_small_patch16_224", "model.student_args={depth: 2}", "data.image_size=64"])
    image = torch.randn(2, 3, 64, 64)

    def flops(mask):
        with FlopCounterMode(display=False) as counter:
            student(image, mask, visible_only=True)
        return counter.get_total_flops()

    full = flops(torch.zeros(2, 4, 4, dtype=torch.bool))
    quarter = flops(_random_mask(2, 4, 12))
    out = student(image, _random_mask(2, 4, 12), visible_only=True)
    assert out.tokens.shape == (2, 4, student.num_features)
    # block FLOPs scale with the kept tokens (+ the class token); patch embedding is the same in both
    assert 0.2 < quarter / full < 0.4


def test_visible_only_matches_full_forward_on_an_unmasked_image():
    student = _student(TINY_VIT)
    image = torch.randn(2, 3, 32, 32)
    none = torch.zeros(2, 4, 4, dtype=torch.bool)
    visible = student(image, none, visible_only=True, levels=[0, 1])
    full = student(image, None, levels=[0, 1])
    torch.testing.assert_close(visible.tokens, full.tokens)
    assert len(visible.levels) == 2 and visible.keep_index.shape == (2, 16)


def test_swin_mask_token_and_stride32_output():
    student = _student(TINY_SWIN)
    assert student.family == "swin" and student.patch_size == 4 and student.out_stride == 32
    image = torch.randn(2, 3, 64, 64)
    mask = torch.zeros(2, 16, 16, dtype=torch.bool)
    mask[:, :8] = True
    captured = {}
    handle = student.backbone.layers[0].register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0]))
    out = student(image, mask)
    handle.remove()
    plain = student.backbone.patch_embed(image)
    assert torch.equal(captured["x"][~mask], plain[~mask])
    torch.testing.assert_close(captured["x"][mask], student.mask_token[0].expand(int(mask.sum()), -1))
    assert out.tokens.shape == (2, 2, 2, student.num_features)
    recon = PixelShuffleHead(student.num_features, 32)(out.tokens)
    assert recon.shape == image.shape


def test_mask_grid_mismatch_is_a_clear_error():
    student = _student(TINY_VIT)
    with pytest.raises(ValueError, match="token_stride=8"):
        student(torch.randn(1, 3, 32, 32), torch.zeros(1, 2, 2, dtype=torch.bool))


def test_unknown_student_is_a_config_error():
    with pytest.raises(ConfigError, match="model.student"):
        build_student(load_config(None, ["model.student=not_a_model"]))


def test_linear_pixel_head_lays_tokens_out_as_patches():
    head = LinearPixelHead(4, stride=2)
    tokens = torch.randn(1, 9, 4)
    image = head(tokens)
    assert image.shape == (1, 3, 6, 6)
    patch = head.proj(tokens[0, 4]).view(3, 2, 2)  # token (1, 1) -> pixels [2:4, 2:4]
    torch.testing.assert_close(image[0, :, 2:4, 2:4], patch)


def test_dynamic_alignment_matches_direct_computation():
    torch.manual_seed(0)
    head = DynamicAlignHead(student_dim=8, student_depth=4, teacher_dim=6, teacher_levels=[-2, -1], teacher_depth=6)
    with torch.no_grad():
        head.mixing.add_(torch.randn_like(head.mixing) * 0.1)
    levels = [torch.randn(2, 5, 8) for _ in range(4)]
    preds = head(levels)
    for t in range(2):
        mixed = sum(head.mixing[t, s] * levels[s] for s in range(4))
        expected = mixed @ head.adapters[t].weight.T + head.adapters[t].bias
        torch.testing.assert_close(preds[t], expected)


def test_dynamic_alignment_starts_near_identity():
    weights = identity_like_mixing([-5, -4, -3, -2, -1], teacher_depth=12, student_depth=12)
    assert weights.argmax(1).tolist() == [7, 8, 9, 10, 11]
    assert torch.allclose(weights.sum(1), torch.full((5,), 1.0 + 0.12))
    half = identity_like_mixing([-1, -3], teacher_depth=24, student_depth=12)
    assert half.argmax(1).tolist() == [11, 10]


@pytest.mark.parametrize("overrides", [TINY_VIT, TINY_SWIN], ids=["vit", "swin"])
def test_backbone_is_called_as_a_module(overrides):
    """ZeRO-3 gathers a module's own parameters (ViT cls_token/pos_embed) only when the module is called."""
    student = _student(overrides)
    calls = []
    student.backbone.register_forward_pre_hook(lambda module, args: calls.append(1))
    side = 32 if overrides is TINY_VIT else 64
    grid = side // student.patch_size
    student(torch.randn(1, 3, side, side), torch.zeros(1, grid, grid, dtype=torch.bool))
    if student.family == "vit":
        student(torch.randn(1, 3, side, side), torch.zeros(1, grid, grid, dtype=torch.bool), visible_only=True)
    assert len(calls) == (2 if student.family == "vit" else 1)


def test_sincos_pos_embed_init_is_a_2d_table_and_stays_learned():
    plain, sincos = _student(TINY_VIT), _student([*TINY_VIT, "model.pos_embed_init=sincos"])
    table = sincos.backbone.pos_embed[0]  # [1 + 4*4, 192]: class-token row, then the 4x4 grid row-major
    assert sincos.backbone.pos_embed.requires_grad and table.shape == plain.backbone.pos_embed[0].shape
    assert torch.equal(table[0], torch.zeros(192))
    grid = table[1:].view(4, 4, 192)
    # every channel depends on the column only or on the row only, half of them each (low frequencies can be both)
    column_only = [bool((grid[:, :, c] == grid[:1, :, c]).all()) for c in range(192)]
    row_only = [bool((grid[:, :, c] == grid[:, :1, c]).all()) for c in range(192)]
    assert all(a or b for a, b in zip(column_only, row_only, strict=True))
    assert sum(column_only) >= 96 and sum(row_only) >= 96
    unit = torch.nn.functional.normalize(table[1:], dim=-1)
    similarity = (unit @ unit.T)[0].view(4, 4)  # of patch (0, 0) to every patch: falls with distance
    assert similarity[0, 0] > similarity[0, 1] > similarity[0, 3] and similarity[1, 1] > similarity[3, 3]
    assert not torch.allclose(plain.backbone.pos_embed, sincos.backbone.pos_embed)


def test_sincos_pos_embed_init_needs_a_vit():
    with pytest.raises(ConfigError, match="pos_embed_init=sincos needs a ViT"):
        _student([*TINY_SWIN, "model.pos_embed_init=sincos"])
    with pytest.raises(ConfigError, match="model.pos_embed_init"):
        load_config(None, ["model.pos_embed_init=rope"])
