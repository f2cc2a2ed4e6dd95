"""Method components: target normalisations and losses, one registry per kind (``TARGET_NORMS``, ``LOSSES``).

Every loss is computed in fp32 whatever the training precision (EVA/MaskDistill practice: bf16 losses on
whitened targets are too coarse), and reduces over the positions the method says (masked or visible).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mimscale.config import ConfigError

# ------------------------------------------------------------------------------------------- target norms


def layernorm_target(target: torch.Tensor) -> torch.Tensor:
    """Whiten each token's feature vector (LayerNorm without affine), as MaskDistill/MaskAlign/EVA do."""
    return F.layer_norm(target.float(), (target.shape[-1],), eps=1e-6)


def patch_pixel_target(image: torch.Tensor, patch: int) -> torch.Tensor:
    """MAE-style per-patch pixel normalisation of a [B, C, H, W] image (each patch to zero mean, unit var)."""
    batch, channels, height, width = image.shape
    x = image.float().reshape(batch, channels, height // patch, patch, width // patch, patch)
    mean = x.mean(dim=(1, 3, 5), keepdim=True)
    var = x.var(dim=(1, 3, 5), keepdim=True)  # unbiased, as MAE's norm_pix_loss (torch.var default)
    return ((x - mean) / (var + 1e-6).sqrt()).reshape(batch, channels, height, width)


def no_target_norm(target: torch.Tensor) -> torch.Tensor:
    return target.float()


@dataclass(frozen=True)
class TargetNorm:
    """A target normalisation and the targets it applies to (``pixel`` [B, C, H, W] and/or ``feature`` [..., C])."""

    build: Callable[[int], Callable[[torch.Tensor], torch.Tensor]]  # student patch size -> norm
    targets: tuple[str, ...]


TARGET_NORMS: dict[str, TargetNorm] = {
    "none": TargetNorm(lambda patch: no_target_norm, ("pixel", "feature")),
    "layernorm": TargetNorm(lambda patch: layernorm_target, ("feature",)),
    "patch_pixel": TargetNorm(lambda patch: functools.partial(patch_pixel_target, patch=patch), ("pixel",)),
}


def build_target_norm(name: str, target: str, patch: int = 1) -> Callable[[torch.Tensor], torch.Tensor]:
    """The normalisation ``name`` (method.target_norm) for ``target`` (``pixel`` or ``feature``)."""
    fitting = [key for key, norm in TARGET_NORMS.items() if target in norm.targets]
    if name not in fitting:
        raise ConfigError(
            f"method.target_norm={name!r} does not apply to {target} targets; choose auto or one of {', '.join(fitting)}"
        )
    return TARGET_NORMS[name].build(patch)


# ------------------------------------------------------------------------------------------------- losses


def _weighted_mean(per_element: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Mean over positions weighted by ``weight`` ([...], 1 = counts) of a [..., C] elementwise loss.

    Normalised like SimMIM: sum(loss * w) / (sum(w) + 1e-5) / C, so a position's C channels count once.
    """
    if weight is None:
        return per_element.mean()
    weight = weight.float()
    total = (per_element.sum(-1) * weight).sum()
    return total / (weight.sum() + 1e-5) / per_element.shape[-1]


def l1_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    return _weighted_mean((pred.float() - target.float()).abs(), weight)


def mse_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    return _weighted_mean((pred.float() - target.float()).pow(2), weight)


def make_smooth_l1(beta: float = 1.0) -> Callable:
    """Smooth-L1 (Huber / beta): quadratic within ``beta``, linear outside; robust to outlier features."""
    if beta <= 0:
        raise ConfigError(f"method.loss_args.beta must be positive, got {beta}")

    def smooth_l1_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        per_element = F.smooth_l1_loss(pred.float(), target.float(), reduction="none", beta=beta)
        return _weighted_mean(per_element, weight)

    return smooth_l1_loss


def cosine_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Negative cosine similarity per position (1 - cos), averaged over the weighted positions."""
    per_position = 1.0 - F.cosine_similarity(pred.float(), target.float(), dim=-1)
    return _weighted_mean(per_position.unsqueeze(-1), weight)


def infonce_loss(query: torch.Tensor, key: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """InfoNCE over groups: query [G, M, D] and key [G, M, D]; query i's positive is key i of its group.

    The other M-1 keys of the same group are the negatives (RelaxMIM: one group, every masked patch of the batch).
    """
    if temperature <= 0:
        raise ConfigError(f"method.loss_args.temperature must be positive, got {temperature}")
    q = F.normalize(query.float(), dim=-1)
    k = F.normalize(key.float(), dim=-1)
    logits = torch.einsum("gmd,gnd->gmn", q, k) / temperature
    labels = torch.arange(logits.shape[1], device=logits.device).expand(logits.shape[0], -1)
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten())


@dataclass(frozen=True)
class Loss:
    """A loss by kind: ``regression`` (pred, target, weight) or ``contrastive`` (query, key), and its loss_args."""

    build: Callable[..., Callable]  # **loss_args -> loss function
    kind: str
    args: tuple[str, ...] = ()


def make_infonce(temperature: float = 0.2) -> Callable:
    if temperature <= 0:
        raise ConfigError(f"method.loss_args.temperature must be positive, got {temperature}")
    return functools.partial(infonce_loss, temperature=temperature)


LOSSES: dict[str, Loss] = {
    "l1": Loss(lambda: l1_loss, "regression"),
    "mse": Loss(lambda: mse_loss, "regression"),
    "smooth_l1": Loss(lambda beta=1.0: make_smooth_l1(float(beta)), "regression", ("beta",)),
    "cosine": Loss(lambda: cosine_loss, "regression"),
    "infonce": Loss(lambda temperature=0.2: make_infonce(float(temperature)), "contrastive", ("temperature",)),
}


def build_loss(name: str, loss_args: dict, kind: str) -> Callable:
    """Loss ``name`` (method.loss) of ``kind`` with ``loss_args`` (method.loss_args, e.g. beta for smooth_l1)."""
    fitting = [key for key, loss in LOSSES.items() if loss.kind == kind]
    if name not in fitting:
        raise ConfigError(f"method.loss={name!r} is not a {kind} loss; choose auto or one of {', '.join(fitting)}")
    unknown = set(loss_args) - set(LOSSES[name].args)
    if unknown:
        raise ConfigError(f"method.loss_args has keys {sorted(unknown)} that loss {name!r} does not take")
    return LOSSES[name].build(**loss_args)
