"""MaskAlign: align the visible tokens of a visible-only student with several whitened teacher levels.

The student never sees mask tokens (it drops masked patches, so it costs ~keep-ratio of a full forward); the
Dynamic Alignment head mixes all student block outputs per teacher level, and the class token plus the visible
patch tokens are aligned with the teacher's (smooth-L1, averaged over levels; MaskAlign's extra factor 2 is left
out, which Adam does not notice). Masks come from the batch (random)
or, with ``mask.kind: attention_guided``, from the teacher's class-token attention: tokens are kept by sampling
without replacement in proportion to attention, as MaskAlign does, and the batch mask is ignored.
"""

from __future__ import annotations

import torch

from mimscale.config import Config, ConfigError
from mimscale.methods.base import MIMMethod
from mimscale.methods.components import build_loss, build_target_norm
from mimscale.models.heads import DynamicAlignHead
from mimscale.models.students import Student, gather_tokens
from mimscale.models.teachers import FrozenTeacher, build_teacher, resize_token_map


def attention_guided_mask(cls_attention: torch.Tensor, num_masked: int) -> torch.Tensor:
    """[B, h, w] attention -> [B, h, w] bool mask: keep tokens sampled with probability ~ attention."""
    batch, h, w = cls_attention.shape
    weights = cls_attention.flatten(1).float().clamp_min(1e-12)
    keep = torch.multinomial(weights, h * w - num_masked, replacement=False)
    mask = torch.ones(batch, h * w, dtype=torch.bool, device=cls_attention.device)
    mask.scatter_(1, keep, False)
    return mask.view(batch, h, w)


class MaskAlign(MIMMethod):
    visible_only = True

    def __init__(self, student: Student, head: DynamicAlignHead, mask_kind: str, teacher: FrozenTeacher, loss, norm):
        data_kind = "random_tokens" if mask_kind == "attention_guided" else mask_kind
        super().__init__(student, head, data_kind, teachers=(teacher,))
        self.attention_guided = mask_kind == "attention_guided"
        self.loss_fn = loss
        self.target_norm = norm

    def forward(self, batch: dict) -> dict:
        image, mask = batch["image"], batch["mask"].bool()
        grid = tuple(mask.shape[-2:])
        teacher_out = self.teacher(image, need_cls_attention=self.attention_guided)
        if self.attention_guided:
            attention = resize_token_map(teacher_out.cls_attention.to(image.device), grid)
            masked = batch.get("masked_count")  # counted on the host by the engine: no device sync
            mask = attention_guided_mask(attention, int(mask[0].sum()) if masked is None else masked)
        out = self.student(
            image, mask, visible_only=True, levels=range(self.student.depth), masked_count=batch.get("masked_count")
        )
        prefix = self.student.num_prefix_tokens
        # Aligned tokens: the class token (when the student has one) and the visible patches, as MaskAlign does.
        with_cls = prefix > 0
        preds = self.head(
            [torch.cat([level[:, :1], level[:, prefix:]], 1) if with_cls else level for level in out.levels]
        )
        losses = []
        for pred, level, cls in zip(preds, teacher_out.levels, teacher_out.class_tokens, strict=True):
            target = resize_token_map(level.float().to(image.device), grid).flatten(1, 2)
            target = gather_tokens(target, out.keep_index)
            if with_cls:
                target = torch.cat([cls.float().to(image.device).unsqueeze(1), target], 1)
            losses.append(self.loss_fn(pred.float(), self.target_norm(target)))
        loss = torch.stack(losses).mean()
        return {"loss": loss, "last_level_loss": losses[-1].detach(), "mask_ratio": mask.float().mean().detach()}

    def head_activation_elements(self, image_size: int, masked: int) -> int:
        """Dynamic Alignment stacks every student block's output, which keeps them all alive for backward (even
        under activation checkpointing), besides the adapters' inputs and predictions."""
        stacked = self.student.depth * self.student_tokens(image_size, masked) * self.student.embed_dim
        return super().head_activation_elements(image_size, masked) + stacked


def build_maskalign(cfg: Config, preset, student: Student) -> MaskAlign:
    if not student.arch.can_drop_tokens:
        raise ConfigError(
            f"method.name=maskalign drops masked tokens, which {student.arch.name} students cannot (their relative "
            "position biases or windows need the full grid); pick a timm ViT such as vit_base_patch16_224"
        )
    teacher = build_teacher(cfg.teacher, preset.teacher_output, cfg.data)
    head = DynamicAlignHead(
        student_dim=student.num_features,
        student_depth=student.depth,
        teacher_dim=teacher.out_dim,
        teacher_levels=teacher.layers,
        teacher_depth=teacher.depth,
    )
    loss = build_loss(preset.loss, cfg.method.loss_args, kind="regression")
    return MaskAlign(student, head, preset.mask_kind, teacher, loss, build_target_norm(preset.target_norm, "feature"))
