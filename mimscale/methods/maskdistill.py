"""MaskDistill: regress whitened CLIP features of the masked tokens from a mask-token student."""

from __future__ import annotations

import torch
from torch import nn

from mimscale.config import Config, ConfigError
from mimscale.methods.base import MIMMethod
from mimscale.methods.components import build_loss, build_target_norm
from mimscale.models.heads import TokenLinearHead
from mimscale.models.students import Student
from mimscale.models.teachers import FrozenTeacher, build_teacher, resize_token_map


def student_token_map(student: Student, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Student output as a [B, h, w, C] map on the token grid (ViT tokens reshaped; Swin needs stride 32 == patch)."""
    if tokens.ndim == 4:
        return tokens
    return tokens.reshape(tokens.shape[0], grid[0], grid[1], -1)


class MaskDistill(MIMMethod):
    """Student sees all tokens (mask token on masked ones); a linear head predicts the teacher's masked tokens."""

    def __init__(self, student: Student, head: nn.Module, mask_kind: str, teacher: FrozenTeacher, loss, target_norm):
        super().__init__(student, head, mask_kind, teachers=(teacher,))
        self.loss_fn = loss
        self.target_norm = target_norm

    def forward(self, batch: dict) -> dict:
        image, mask = batch["image"], batch["mask"].bool()
        grid = tuple(mask.shape[-2:])
        target = self.teacher(image).levels[-1]
        target = self.target_norm(resize_token_map(target.float().to(image.device), grid))
        out = self.student(image, mask)
        pred = self.head(student_token_map(self.student, out.tokens, grid))
        loss = self.loss_fn(pred.float(), target, mask)
        return {"loss": loss, "target_std": target.std().detach()}


def build_maskdistill(cfg: Config, preset, student: Student) -> MaskDistill:
    if not student.arch.is_vit_like:
        raise ConfigError("method.name=maskdistill needs a ViT student (token grid = patch grid); pick a timm ViT")
    teacher = build_teacher(cfg.teacher, preset.teacher_output, cfg.data)
    if len(teacher.layers) != 1:
        raise ConfigError("maskdistill distils one teacher block: set teacher.layers to one index (e.g. [-1])")
    head = TokenLinearHead(student.num_features, teacher.out_dim)
    loss = build_loss(preset.loss, cfg.method.loss_args, kind="regression")
    return MaskDistill(student, head, preset.mask_kind, teacher, loss, build_target_norm(preset.target_norm, "feature"))
