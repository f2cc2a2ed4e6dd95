"""SimMIM: predict raw pixels of masked patches with a light head; L1 on masked pixels only."""

from __future__ import annotations

from torch import nn

from mimscale.config import Config
from mimscale.methods.base import MIMMethod, upsample_mask
from mimscale.methods.components import build_loss, build_target_norm
from mimscale.models.heads import LinearPixelHead, PixelShuffleHead
from mimscale.models.students import Student


class SimMIM(MIMMethod):
    """Student sees all tokens (masked ones replaced by the mask token); the head reconstructs the image.

    ``target_norm`` maps the [B, 3, H, W] image to the target: ``none`` (SimMIM default, pixels as the loader
    normalised them) or ``patch_pixel`` (each patch whitened), from ``components.TARGET_NORMS``.
    """

    def __init__(self, student: Student, head: nn.Module, mask_kind: str, loss, target_norm):
        super().__init__(student, head, mask_kind)
        self.loss_fn = loss
        self.target_norm = target_norm

    def forward(self, batch: dict) -> dict:
        image, mask = batch["image"], batch["mask"].bool()
        out = self.student(image, mask)
        recon = self.head(out.tokens)  # [B, 3, H, W]
        target = self.target_norm(image)
        pixel_mask = upsample_mask(mask, self.student.patch_size)  # [B, H, W]
        loss = self.loss_fn(recon.float().permute(0, 2, 3, 1), target.permute(0, 2, 3, 1), pixel_mask)
        return {"loss": loss, "mask_ratio": mask.float().mean().detach()}


def build_simmim(cfg: Config, preset, student: Student) -> SimMIM:
    """A linear per-token decoder for ViT-like students, 1x1 conv + PixelShuffle for Swin-like ones (stride 32)."""
    if student.arch.is_swin_like:
        head = PixelShuffleHead(student.num_features, student.out_stride)
    else:
        head = LinearPixelHead(student.num_features, student.out_stride)
    loss = build_loss(preset.loss, cfg.method.loss_args, kind="regression")
    norm = build_target_norm(preset.target_norm, "pixel", student.patch_size)
    return SimMIM(student, head, preset.mask_kind, loss, norm)
