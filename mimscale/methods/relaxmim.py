"""RelaxMIM (InfoNCE form): the masked view's tokens must pick out their own full-view tokens among the others.

The target is the student itself on the unmasked image, computed without gradient (stop-grad); both views go
through the same projection MLP. InfoNCE runs per image over its masked positions: query i (masked view,
position p_i) has the full-view token at p_i as positive and the other masked positions' tokens as negatives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mimscale.config import Config, ConfigError
from mimscale.methods.base import CountedForward, MIMMethod
from mimscale.methods.components import build_loss
from mimscale.models.heads import ProjectionMLP
from mimscale.models.students import Student, gather_tokens, keep_indices


class RelaxMIM(MIMMethod):
    def __init__(self, student: Student, head: ProjectionMLP, mask_kind: str, loss):
        super().__init__(student, head, mask_kind)
        self.loss_fn = loss

    def forward(self, batch: dict) -> dict:
        image, mask = batch["image"], batch["mask"].bool()
        masked_index = keep_indices(~mask, batch.get("masked_count"))  # masked tokens (same count in every sample)
        with torch.no_grad():
            full = self.student(image, None).tokens
            keys = self.head(gather_tokens(full.flatten(1, -2), masked_index))
        tokens = self.student(image, mask).tokens.flatten(1, -2)
        queries = self.head(gather_tokens(tokens, masked_index))
        loss = self.loss_fn(queries, keys.detach())
        with torch.no_grad():
            hits = torch.einsum("gmd,gnd->gmn", queries.float(), F.normalize(keys.float(), dim=-1)).argmax(-1)
            accuracy = (hits == torch.arange(hits.shape[1], device=hits.device)).float().mean()
        return {"loss": loss, "match_accuracy": accuracy}

    def counted_forwards(self, masked: int) -> list[CountedForward]:
        """Besides the student's masked view: its own no-grad forward on the full view (the target)."""
        target = CountedForward("target", self.student, lambda images: self.student(images).tokens, trained=False)
        return [*super().counted_forwards(masked), target]


def build_relaxmim(cfg: Config, preset, student: Student) -> RelaxMIM:
    if not student.arch.is_vit_like:
        raise ConfigError("method.name=relaxmim needs a ViT student (token-level contrast); pick a timm ViT")
    loss = build_loss(preset.loss, cfg.method.loss_args, kind="contrastive")
    if preset.target_norm != "none":  # the target is the projector's output, never a normalised feature
        raise ConfigError(f"method.target_norm={preset.target_norm!r} is not valid for relaxmim; use auto or none")
    return RelaxMIM(student, ProjectionMLP(student.num_features), preset.mask_kind, loss)
