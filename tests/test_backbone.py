"""One Backbone view answers the structural questions for every timm family the students use."""

from __future__ import annotations

import pytest
import timm
import torch

from mimscale.models.backbone import Backbone, UnknownBackboneError
from mimscale.models.students import Student

TINY = {
    "vit": ("vit_tiny_patch16_224", {"depth": 2, "patch_size": 8, "img_size": 32}),
    "swin": (
        "swin_tiny_patch4_window7_224",
        {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1], "window_size": 2, "img_size": 64},
    ),
    "swinv2": (
        "swinv2_tiny_window8_256",
        {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1], "window_size": 2, "img_size": 64},
    ),
    "beit": (
        "beit_base_patch16_224",
        {
            "depth": 2,
            "embed_dim": 64,
            "num_heads": 2,
            "patch_size": 8,
            "img_size": 32,
            "use_abs_pos_emb": True,
            "use_fc_norm": False,
        },  # a per-token final norm: what a MIM student needs (Student checks it)
    ),
}
# family, ViT-like, can drop tokens, patch, grid, depth, level widths, blocks, prefix tokens, out stride
EXPECTED = {
    "vit": ("vit", True, True, 8, (4, 4), 2, [192, 192], 2, 1, 8),
    "swin": ("swin", False, False, 4, (16, 16), 4, [16, 32, 64, 128], 4, 0, 32),
    "swinv2": ("swin", False, False, 4, (16, 16), 4, [16, 32, 64, 128], 4, 0, 32),
    "beit": ("beit", True, False, 8, (4, 4), 2, [64, 64], 2, 1, 8),
}


@pytest.mark.parametrize("kind", list(TINY))
def test_backbone_answers_for_every_family(kind):
    name, args = TINY[kind]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=0, **args)
    arch = Backbone(model)
    answers = (
        arch.name,
        arch.is_vit_like,
        arch.can_drop_tokens,
        arch.patch,
        arch.grid(),
        arch.depth,
        arch.level_dims,
        len(arch.blocks),
        arch.num_prefix_tokens,
        arch.out_stride,
    )
    assert answers == EXPECTED[kind]
    assert arch.is_swin_like != arch.is_vit_like and arch.grid(args["img_size"] * 2) == tuple(
        2 * g for g in arch.grid()
    )
    student = Student(model)  # the masked forward works through the same answers
    side = args["img_size"]
    mask = torch.zeros(2, *arch.grid(side), dtype=torch.bool)
    mask[:, : mask.shape[1] // 2] = True
    out = student(torch.randn(2, 3, side, side), mask, levels=[0, -1])
    out.tokens.float().pow(2).mean().backward()
    assert student.mask_token.grad is not None and student.mask_token.grad.abs().sum() > 0
    assert [level.shape[-1] for level in out.levels] == [arch.level_dims[0], arch.level_dims[-1]]
    if not arch.can_drop_tokens:
        with pytest.raises(ValueError, match="cannot drop masked tokens"):
            student(torch.randn(2, 3, side, side), mask, visible_only=True)


def test_an_unknown_model_is_named():
    with pytest.raises(UnknownBackboneError, match="Linear is not a timm backbone"):
        Backbone(torch.nn.Linear(2, 2))


# family, layer decay fine-tuning starts from (SimMIM: 0.65 ViT, 0.9 Swin), attention within windows
FINETUNE_ANSWERS = {
    "vit": ("vit", 0.65, False),
    "swin": ("swin", 0.9, True),
    "swinv2": ("swin", 0.9, True),
    "beit": ("beit", 0.65, False),
}


@pytest.mark.parametrize("kind", list(TINY))
def test_a_classifier_is_answered_by_its_family_for_finetune_and_analysis(kind):
    """finetune and analyze ask their family questions of timm classifiers (a head on top) through Backbone."""
    from mimscale.eval.finetune import default_layer_decay

    name, args = TINY[kind]
    classifier = timm.create_model(name, pretrained=False, num_classes=3, **args)
    arch = Backbone(classifier)
    assert (arch.name, arch.layer_decay, arch.windowed_attention) == FINETUNE_ANSWERS[kind]
    assert arch.image_size == args["img_size"]
    assert default_layer_decay(classifier) == FINETUNE_ANSWERS[kind][1]
