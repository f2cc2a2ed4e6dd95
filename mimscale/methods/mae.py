"""MAE (He et al. 2022, facebookresearch/mae): a visible-only ViT encoder, a lightweight decoder on every token,
per-patch normalised pixels of the masked patches as the target, mean squared error on the masked patches only.

The encoder is the student's visible-only forward (MaskAlign's): patch embedding plus the fixed 2-D sin-cos table
(``model.pos_embed_init: sincos_frozen``), masked patches dropped, class token kept. The decoder
(``models/heads.MAEDecoder``) is the method's head. Masks come from the data workers (``random_tokens``: exactly
``int(N * (1 - ratio))`` kept, MAE's ``len_keep``); MAE's ``random_masking`` draws the same kind of mask from
noise (``tests/test_mae.py`` feeds both the same mask and checks equal losses and gradients).

What the engine and planner need they read from the method: two trained forwards (the encoder on the kept tokens,
the decoder on all of them), the decoder's blocks among the checkpointed and compiled blocks, and the student's
backbone alone as the export (the encoder, which plain timm loads).
"""

from __future__ import annotations

import torch
from torch import nn

from mimscale.config import Config, ConfigError
from mimscale.methods.base import CountedForward, MIMMethod
from mimscale.methods.components import build_loss, build_target_norm
from mimscale.models.heads import MAEDecoder, init_like_mae
from mimscale.models.students import Student

DECODER_ARGS = ("width", "depth", "heads", "mlp_ratio")


def patchify(image: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, N, patch * patch * C] in MAE's layout (row-major patches, pixel-major, channel last)."""
    batch, channels, height, width = image.shape
    x = image.reshape(batch, channels, height // patch, patch, width // patch, patch)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(batch, -1, patch * patch * channels)


class MAE(MIMMethod):
    visible_only = True

    def __init__(self, student: Student, head: MAEDecoder, mask_kind: str, loss, target_norm):
        super().__init__(student, head, mask_kind)
        self.loss_fn = loss
        self.target_norm = target_norm

    def forward(self, batch: dict) -> dict:
        image, mask = batch["image"], batch["mask"].bool()
        out = self.student(image, mask, visible_only=True, masked_count=batch.get("masked_count"))
        latent = out.tokens if out.prefix is None else torch.cat([out.prefix, out.tokens], dim=1)
        pred = self.head(latent, out.keep_index)  # [B, N, p*p*3]
        target = patchify(self.target_norm(image), self.student.patch_size)
        loss = self.loss_fn(pred.float(), target, mask.flatten(1))
        return {"loss": loss, "mask_ratio": mask.float().mean().detach()}

    # ------------------------------------------------------------------ self-description for planner and engine
    def set_grad_checkpointing(self, enable: bool) -> None:
        super().set_grad_checkpointing(enable)
        self.head.set_grad_checkpointing(enable)

    def trained_blocks(self) -> list[nn.Module]:
        return [*super().trained_blocks(), *self.head.decoder_blocks]

    def decoder_cost_forward(self, images: torch.Tensor, masked: int) -> torch.Tensor:
        """The decoder on every token, fed an encoder output of the right shape (runnable on the meta device)."""
        keep = self.grid_tokens(images.shape[-1]) - masked
        width = self.student.num_features
        latent = images.new_zeros(images.shape[0], self.student.num_prefix_tokens + keep, width)
        keep_index = torch.arange(keep, device=images.device).expand(images.shape[0], keep)
        return self.head(latent, keep_index)

    def counted_forwards(self, masked: int) -> list[CountedForward]:
        """The encoder on the kept tokens (the base's visible-only student), then the decoder on all of them."""
        decoder = CountedForward(
            "decoder", self.head, lambda images: self.decoder_cost_forward(images, masked), trained=True
        )
        return [*super().counted_forwards(masked), decoder]

    def head_activation_elements(self, image_size: int, masked: int) -> int:
        """The decoder is traced as a trained forward; what remains is the loss's prediction and target."""
        return 2 * self.grid_tokens(image_size) * self.head.decoder_pred.out_features


def build_mae(cfg: Config, preset, student: Student) -> MAE:
    if not student.arch.can_drop_tokens:
        raise ConfigError(
            f"method.name=mae drops masked tokens, which {student.arch.name} students cannot (their relative position "
            "biases or windows need the full grid); pick a timm ViT such as vit_base_patch16_224"
        )
    unknown = set(cfg.method.decoder_args) - set(DECODER_ARGS)
    if unknown:
        raise ConfigError(
            f"method.decoder_args has keys {sorted(unknown)}; the MAE decoder takes {', '.join(DECODER_ARGS)}"
        )
    try:
        head = MAEDecoder(
            student.num_features,
            student.arch.grid(cfg.data.image_size),
            student.patch_size,
            prefix_tokens=student.num_prefix_tokens,
            **cfg.method.decoder_args,
        )
    except (AssertionError, TypeError, ValueError) as err:
        raise ConfigError(
            f"method.decoder_args={cfg.method.decoder_args} does not build an MAE decoder: {err}"
        ) from err
    init_like_mae(student.backbone)
    init_like_mae(head)
    student.mask_token.requires_grad_(False)  # the encoder never sees a mask token: MAE's is the decoder's
    loss = build_loss(preset.loss, cfg.method.loss_args, kind="regression")
    norm = build_target_norm(preset.target_norm, "pixel", student.patch_size)
    return MAE(student, head, preset.mask_kind, loss, norm)
