"""SimMIM: predict raw pixels of masked patches with a light head; L1 on masked pixels only."""

from __future__ import annotations

from torch import nn

from mimscale.methods.base import MIMMethod, upsample_mask
from mimscale.methods.components import patch_pixel_target
from mimscale.models.students import Student


class SimMIM(MIMMethod):
    """Student sees all tokens (masked ones replaced by the mask token); the head reconstructs the image.

    ``target_norm``: ``none`` (SimMIM default, pixels as the loader normalised them) or ``patch_pixel``
    (each ``norm_patch`` x ``norm_patch`` patch whitened).
    """

    def __init__(self, student: Student, head: nn.Module, mask_kind: str, loss, target_norm: str = "none"):
        super().__init__(student, head, mask_kind)
        self.loss_fn = loss
        self.target_norm = target_norm

    def forward(self, batch: dict) -> dict:
        image, mask = batch["image"], batch["mask"].bool()
        out = self.student(image, mask)
        recon = self.head(out.tokens)  # [B, 3, H, W]
        target = image.float()
        if self.target_norm == "patch_pixel":
            target = patch_pixel_target(target, self.student.patch_size)
        pixel_mask = upsample_mask(mask, self.student.patch_size)  # [B, H, W]
        loss = self.loss_fn(recon.float().permute(0, 2, 3, 1), target.permute(0, 2, 3, 1), pixel_mask)
        return {"loss": loss, "mask_ratio": mask.float().mean().detach()}
