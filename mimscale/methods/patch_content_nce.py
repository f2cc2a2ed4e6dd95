"""patch_content_nce (our own objective, no paper's): each masked token must pick out the content of its own patch
among every masked patch of the micro-batch.

Until issue 22 this was the ``relaxmim`` preset; it is not RelaxMIM (Kong & Zhang 2022), which compares a masked
view with the full view of the same image (``methods/relaxmim.py``). No paper claim is attributed to it.

Query: the student's output at a masked position (masked view, mask token + position), through the projection
MLP. Key: the same patch's content alone: the student's own patch embedding of that patch (stop-grad, no position
embedding, no attention to other patches), through the same projection MLP. Candidates: all masked patches of
all images in the micro-batch (other positions of the same image and every masked patch of the other images).

Why this shape (issue 11.3): the first relaxmim version matched against the student's full-view tokens, which carry the
same position embedding as the query, with the image's other positions as negatives: position alone solved it
(match accuracy 0.6 on pure noise within 40 steps). A key can only be told apart by what its patch shows when it
holds neither position nor context: context would let the query recognise *which image* a key comes from by the
visible patches both share, which works on noise too. With content-only keys the query has to predict what the
hidden patch looks like: on noise that is impossible (chance), on photos the image's visible patches predict it.
The keys cost one patch embedding, not a second forward pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mimscale.config import Config, ConfigError
from mimscale.methods.base import CountedForward, MIMMethod
from mimscale.methods.components import build_loss
from mimscale.models.heads import ProjectionMLP
from mimscale.models.students import Student, gather_tokens, keep_indices


class PatchContentNCE(MIMMethod):
    def __init__(self, student: Student, head: ProjectionMLP, mask_kind: str, loss):
        super().__init__(student, head, mask_kind)
        self.loss_fn = loss

    def patch_content(self, image: torch.Tensor) -> torch.Tensor:
        """[B, N, C] stop-grad patch embeddings: each patch's pixels only, no position, no context."""
        with torch.no_grad():
            return self.student.arch.patch_embed(image).flatten(1, -2)

    def forward(self, batch: dict) -> dict:
        image, mask = batch["image"], batch["mask"].bool()
        masked_index = keep_indices(~mask, batch.get("masked_count"))  # masked tokens (same count in every sample)
        with torch.no_grad():
            keys = self.head(gather_tokens(self.patch_content(image), masked_index)).flatten(0, 1).unsqueeze(0)
        tokens = self.student(image, mask).tokens.flatten(1, -2)
        queries = self.head(gather_tokens(tokens, masked_index)).flatten(0, 1).unsqueeze(0)  # [1, B*M, D]
        loss = self.loss_fn(queries, keys.detach())
        return {"loss": loss, **match_scores(queries[0].detach(), keys[0])}

    def counted_forwards(self, masked: int) -> list[CountedForward]:
        """Besides the student's masked view: the no-grad patch embedding the keys come from."""
        keys = CountedForward("target", self.student, self.patch_content, trained=False)
        return [*super().counted_forwards(masked), keys]


def match_scores(queries: torch.Tensor, keys: torch.Tensor) -> dict[str, torch.Tensor]:
    """How well [N, D] queries find their own [N, D] keys: top-1 ``match_accuracy`` (chance ``match_chance`` =
    1/N) and ``match_rank``, the mean fraction of other keys ranked above the right one (0 = always first, 0.5 =
    chance), which separates small effects that top-1 quantises away."""
    similarity = F.normalize(queries.float(), dim=-1) @ F.normalize(keys.float(), dim=-1).T
    positive = similarity.diagonal().unsqueeze(1)
    count = similarity.shape[0]
    rank = ((similarity > positive).float().sum(1) / max(1, count - 1)).mean()
    accuracy = (similarity.argmax(1) == torch.arange(count, device=similarity.device)).float().mean()
    chance = torch.tensor(1.0 / count, device=similarity.device)
    return {"match_accuracy": accuracy, "match_chance": chance, "match_rank": rank}


def build_patch_content_nce(cfg: Config, preset, student: Student) -> PatchContentNCE:
    if not student.arch.is_vit_like:
        raise ConfigError("method.name=patch_content_nce needs a ViT student (token-level contrast); pick a timm ViT")
    if student.embed_dim != student.num_features:
        raise ConfigError("method.name=patch_content_nce needs a student whose patch embedding and output widths agree")
    loss = build_loss(preset.loss, cfg.method.loss_args, kind="contrastive")
    if preset.target_norm != "none":  # the target is the projector's output, never a normalised feature
        raise ConfigError(
            f"method.target_norm={preset.target_norm!r} is not valid for patch_content_nce; use auto or none"
        )
    return PatchContentNCE(student, ProjectionMLP(student.num_features), preset.mask_kind, loss)
