"""RelaxMIM (InfoNCE form): the masked view's tokens must pick out their own full-view tokens among the others.

The target is the student itself on the unmasked image, computed without gradient (stop-grad); both views go
through the same projection MLP. InfoNCE runs per image over its masked positions: query i (masked view,
position p_i) has the full-view token at p_i as positive and the other masked positions' tokens as negatives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mimscale.config import Config, ConfigError
from mimscale.methods.base import MIMMethod
from mimscale.methods.components import infonce_loss
from mimscale.models.heads import ProjectionMLP
from mimscale.models.students import Student, gather_tokens, keep_indices


class RelaxMIM(MIMMethod):
    def __init__(self, student: Student, head: ProjectionMLP, mask_kind: str, temperature: float):
        super().__init__(student, head, mask_kind)
        self.temperature = temperature

    def forward(self, batch: dict) -> dict:
        image, mask = batch["image"], batch["mask"].bool()
        masked_index = keep_indices(~mask, batch.get("masked_count"))  # masked tokens (same count in every sample)
        with torch.no_grad():
            full = self.student(image, None).tokens
            keys = self.head(gather_tokens(full.flatten(1, -2), masked_index))
        tokens = self.student(image, mask).tokens.flatten(1, -2)
        queries = self.head(gather_tokens(tokens, masked_index))
        loss = infonce_loss(queries, keys.detach(), temperature=self.temperature)
        with torch.no_grad():
            hits = torch.einsum("gmd,gnd->gmn", queries.float(), F.normalize(keys.float(), dim=-1)).argmax(-1)
            accuracy = (hits == torch.arange(hits.shape[1], device=hits.device)).float().mean()
        return {"loss": loss, "match_accuracy": accuracy}


def build_relaxmim(cfg: Config, preset, student: Student) -> RelaxMIM:
    if student.family != "vit":
        raise ConfigError("method.name=relaxmim needs a ViT student (token-level contrast); pick a timm ViT")
    if preset.head != "mlp":
        raise ConfigError(f"method.head={preset.head!r} is not valid for relaxmim; use auto or mlp")
    if preset.loss != "infonce":
        raise ConfigError(f"method.loss={preset.loss!r} is not valid for relaxmim; use auto or infonce")
    unknown = set(cfg.method.loss_args) - {"temperature"}
    if unknown:
        raise ConfigError(f"method.loss_args has {sorted(unknown)}; relaxmim's infonce takes only temperature")
    head = ProjectionMLP(student.num_features)
    return RelaxMIM(student, head, preset.mask_kind, float(cfg.method.loss_args.get("temperature", 0.2)))
