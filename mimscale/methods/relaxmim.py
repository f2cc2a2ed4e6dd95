"""RelaxMIM, contrastive form (Kong & Zhang, "Understanding Masked Image Modeling via Learning Occlusion Invariant
Feature", arXiv 2208.04164): MIM relaxed into a siamese comparison of a masked view and the full view of the same
image, through the same encoder; with InfoNCE as the similarity (the paper's contrastive variant of MAE).

What we implement, and why (the method section's text was not available to us; this follows the abstract and the
paper's summaries: masked view vs unmasked view of one image, the same encoder, an InfoNCE similarity):

* masked view: the student with the mask token at the masked positions (random 75 % of tokens, as MAE);
  full view: the same student on the whole image, run without gradient (the target side, as MAE's pixels are);
* both views mean-pooled over their patch tokens and mapped by one shared projector (MLP to 256-d);
* InfoNCE at the image level: each masked view must pick out its own image's full view among the full views of
  the other images of the micro-batch (the negatives), temperature 0.2.

The negatives are the micro-batch's (methods never call torch.distributed, so no gather over ranks). On noise the
objective is learnable, by design: a masked view still shows a quarter of its image's patches, which identify its
full view among the others: that is the data-agnostic occlusion invariance the paper attributes to MIM. Position
alone cannot solve it: every view of every image carries the same positions (tests/test_relaxmim.py trains on
noise and checks that unrelated pairs stay at chance while true pairs are found).
"""

from __future__ import annotations

import torch

from mimscale.config import Config, ConfigError
from mimscale.methods.base import CountedForward, MIMMethod
from mimscale.methods.components import build_loss
from mimscale.methods.patch_content_nce import match_scores
from mimscale.models.heads import ProjectionMLP
from mimscale.models.students import Student


class RelaxMIM(MIMMethod):
    def __init__(self, student: Student, head: ProjectionMLP, mask_kind: str, loss):
        super().__init__(student, head, mask_kind)
        self.loss_fn = loss

    def pooled(self, image: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """[B, C] mean of the student's final patch tokens for ``image`` under ``mask`` (None: the full view)."""
        return self.student(image, mask).tokens.flatten(1, -2).mean(1)

    def full_view(self, image: torch.Tensor) -> torch.Tensor:
        """[B, C] stop-grad pooled features of the unmasked image: the target side."""
        with torch.no_grad():
            return self.pooled(image, None)

    def forward(self, batch: dict) -> dict:
        image, mask = batch["image"], batch["mask"].bool()
        keys = self.head(self.full_view(image)).detach()
        queries = self.head(self.pooled(image, mask))
        loss = self.loss_fn(queries.unsqueeze(0), keys.unsqueeze(0))
        return {"loss": loss, **match_scores(queries.detach(), keys), "key_similarity": mean_pairwise_cosine(keys)}

    def counted_forwards(self, masked: int) -> list[CountedForward]:
        """Besides the student's masked view: its no-grad full view."""
        target = CountedForward("target", self.student, self.full_view, trained=False)
        return [*super().counted_forwards(masked), target]


def mean_pairwise_cosine(keys: torch.Tensor) -> torch.Tensor:
    """Mean cosine between the [N, D] keys of different images: the collapse signal. 1 means every full view maps
    to the same key, so InfoNCE sits at ln N and the queries get (next to) no gradient; with a stop-grad key side
    a run climbs out slowly if at all: lower the lr. On the digits, runs that learned started near 0.93 and ended
    at 0.68-0.86 (RESULTS, Claims, fifth run)."""
    count = keys.shape[0]
    unit = torch.nn.functional.normalize(keys.float(), dim=-1)
    return ((unit @ unit.T).sum() - count) / max(1, count * (count - 1))


def build_relaxmim(cfg: Config, preset, student: Student) -> RelaxMIM:
    if not student.arch.is_vit_like:
        raise ConfigError("method.name=relaxmim needs a ViT student (mask token on the patch grid); pick a timm ViT")
    loss = build_loss(preset.loss, cfg.method.loss_args, kind="contrastive")
    if preset.target_norm != "none":  # the target is the projector's output, never a normalised feature
        raise ConfigError(f"method.target_norm={preset.target_norm!r} is not valid for relaxmim; use auto or none")
    if cfg.data.batch_size < 2:
        raise ConfigError(
            f"method.name=relaxmim needs data.batch_size >= 2 (got {cfg.data.batch_size}): the other images of the "
            "micro-batch are its negatives; with one image the InfoNCE is constant and nothing is learned"
        )
    return RelaxMIM(student, ProjectionMLP(student.num_features), preset.mask_kind, loss)
