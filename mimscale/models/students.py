"""Students: unmodified timm backbones wrapped with a learned mask token and a masked forward.

The backbone is created with ``num_classes=0`` and kept as ``self.backbone`` so that the method's state_dict
keys are ``student.backbone.<plain timm keys>``: export strips the prefix and gets a checkpoint timm loads.
Two families are supported, by what their timm modules look like:

* ViT (``patch_embed``, ``_pos_embed``, ``patch_drop``, ``blocks``, ``norm``): masked patch embeddings are
  replaced by the mask token *before* the position embedding is added (SimMIM/MaskDistill), or dropped after
  it (visible-only forward, MaskAlign/MAE), so the blocks process only the kept tokens.
* Swin / SwinV2 (``patch_embed`` with NHWC output, ``layers`` of stages, ``norm``): masked patch embeddings are
  replaced after the patch embedding; the stages then run unchanged.

The backbone is always *called* and the masking happens in forward hooks on its submodules, so anything that
acts on module calls (ZeRO-3 gathering the backbone's own cls_token/pos_embed, timm's activation checkpointing)
sees an ordinary forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from mimscale.config import Config, ConfigError
from mimscale.models.backbone import Backbone, UnknownBackboneError, as_pair, find_family


@dataclass
class StudentOutput:
    """What a masked student forward returns.

    ``tokens``: final features of the patch tokens after the final norm, [B, N, C] for a ViT (N = kept tokens in
    the visible-only forward), [B, h, w, C] (NHWC, stride 32) for Swin. ``prefix``: [B, P, C] class/register
    tokens of a ViT (None for Swin). ``levels``: requested intermediate block outputs (ViT: [B, P + N, C] before
    the final norm; Swin: stage outputs, NHWC). ``keep_index``: [B, N_keep] indices of the kept tokens
    (visible-only forward), else None.
    """

    tokens: torch.Tensor
    prefix: torch.Tensor | None = None
    levels: list[torch.Tensor] = field(default_factory=list)
    keep_index: torch.Tensor | None = None


def _replace_masked(x: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor) -> torch.Tensor:
    """Swap masked token embeddings for the mask token; works on [B, N, C] and [B, h, w, C] layouts."""
    weight = mask.reshape(*x.shape[:-1], 1).to(x.dtype)
    return x * (1.0 - weight) + mask_token.to(x.dtype) * weight


def keep_indices(mask: torch.Tensor, count: int | None = None) -> torch.Tensor:
    """[B, N_keep] indices (ascending) of the unmasked tokens; every sample must keep the same count.

    ``count``: the number of unmasked tokens per sample when the caller already knows it (the engine counts
    them on the host mask before the copy): then no host sync happens (a stable sort puts the unmasked tokens
    first, in order). Without it the count is checked on the device (``bool()`` and ``nonzero()`` wait for it).
    """
    if count is not None:
        return torch.argsort(mask.flatten(1).to(torch.uint8), dim=1, stable=True)[:, :count]
    visible = ~mask.flatten(1).bool()
    counts = visible.sum(1)
    if counts.numel() and not bool((counts == counts[0]).all()):
        raise ValueError(
            "the visible-only student needs the same number of visible tokens in every sample; use a mask "
            "generator with an exact count (mask.kind random_tokens, blockwise or random_cells)"
        )
    return visible.nonzero()[:, 1].view(mask.shape[0], -1)


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[b, index[b]] for x [B, N, C] and index [B, K]."""
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class Student(nn.Module):
    """A timm backbone plus a learned mask token; ``forward(image, mask)`` runs the masked encoder."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        try:
            self.arch = Backbone(backbone)
        except UnknownBackboneError as err:
            raise ConfigError(f"model.student: {err}") from err
        if self.arch.is_vit_like and isinstance(self.arch.final_norm, nn.Identity):
            raise ConfigError(
                f"model.student={type(backbone).__name__} normalises only after pooling (fc_norm), so its tokens have "
                "no final norm for the MIM head; set model.student_args.use_fc_norm: false (BEiT / SimMIM pretraining)"
            )
        self.family = self.arch.kind
        self.patch_size = self.arch.patch
        self.out_stride = self.arch.out_stride
        self.depth = self.arch.depth
        self.embed_dim = self.arch.embed_dim
        self.num_features = self.arch.num_features
        self.num_prefix_tokens = self.arch.num_prefix_tokens
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block (ViT) or stage's blocks (Swin) in backward to save activation memory."""
        self.backbone.set_grad_checkpointing(enable)

    def forward(
        self,
        image: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        visible_only: bool = False,
        levels: Sequence[int] = (),
        masked_count: int | None = None,
    ) -> StudentOutput:
        """Encode ``image`` with ``mask`` ([B, h, w] bool, True = masked) applied; ``levels`` are block indices.

        ``masked_count``: masked tokens per sample, if known on the host (spares the visible-only path a sync)."""
        if mask is not None:
            grid = image.shape[-2] // self.patch_size, image.shape[-1] // self.patch_size
            if tuple(mask.shape[-2:]) != grid:
                raise ValueError(
                    f"mask grid {tuple(mask.shape[-2:])} does not match the student's token grid {grid} "
                    f"(image {tuple(image.shape[-2:])}, patch {self.patch_size}); build the mask with "
                    f"token_stride={self.patch_size}"
                )
        if visible_only and not self.arch.can_drop_tokens:
            raise ValueError(f"{self.arch.name} students cannot drop masked tokens (their blocks need the full grid)")
        if self.arch.is_swin_like:
            return self._forward_swin(image, mask, levels)
        keep = None if masked_count is None or mask is None else mask[0].numel() - masked_count
        return self._forward_vit(image, mask, visible_only, levels, keep)

    def forward_kept_count(self, image: torch.Tensor, keep: int) -> StudentOutput:
        """Visible-only forward that keeps the first ``keep`` patch tokens: what any ``keep``-token mask costs.

        For planning on the meta device, where gathering tokens by a real mask's indices is impossible.
        """
        prefix = self.num_prefix_tokens
        edit = (self.arch.drop_point, lambda module, args, out: out[:, : prefix + keep])
        x = _run_capturing(self.arch, image, {}, [edit])["final"]
        return StudentOutput(tokens=x[:, prefix:], prefix=x[:, :prefix] if prefix else None)

    def _forward_vit(
        self, image: torch.Tensor, mask: torch.Tensor | None, visible_only: bool, levels: Sequence[int], keep=None
    ) -> StudentOutput:
        # The backbone is *called* (not taken apart) so that wrappers that act on module calls, like ZeRO-3's
        # parameter gathering for cls_token/pos_embed, see a normal forward; masking happens in forward hooks.
        prefix_count = self.num_prefix_tokens
        wanted = [_absolute(i, self.depth) for i in levels]
        index = keep_indices(mask, keep) if mask is not None and visible_only else None

        def replace_masked(module, args, out):
            return _replace_masked(out, mask, self.mask_token)

        def drop_masked(module, args, out):
            return torch.cat([out[:, :prefix_count], gather_tokens(out[:, prefix_count:], index)], dim=1)

        edits = []
        if mask is not None:
            edits.append(
                (self.arch.drop_point, drop_masked) if visible_only else (self.arch.patch_embed, replace_masked)
            )
        captured = _run_capturing(self.arch, image, {i: self.arch.levels[i] for i in wanted}, edits)
        x = captured["final"]
        return StudentOutput(
            tokens=x[:, prefix_count:],
            prefix=x[:, :prefix_count] if prefix_count else None,
            levels=[captured[i] for i in wanted],
            keep_index=index,
        )

    def _forward_swin(self, image: torch.Tensor, mask: torch.Tensor | None, levels: Sequence[int]) -> StudentOutput:
        wanted = [_absolute(i, self.depth) for i in levels]
        edits = []
        if mask is not None:  # patch embeddings are NHWC [B, h, w, C] in timm Swin/SwinV2
            edits.append((self.arch.patch_embed, lambda m, a, out: _replace_masked(out, mask, self.mask_token)))
        captured = _run_capturing(self.arch, image, {i: self.arch.levels[i] for i in wanted}, edits)
        return StudentOutput(tokens=captured["final"], levels=[captured[i] for i in wanted])


def _run_capturing(arch: Backbone, image: torch.Tensor, levels: dict[int, nn.Module], edits: list) -> dict:
    """Call the backbone on ``image`` with forward hooks: ``edits`` ((module, hook) pairs) rewrite module outputs,
    and the outputs of ``levels`` (by index) and of the final norm (as ``"final"``) are returned; hooks removed."""
    captured: dict = {}

    def capture(key):
        def hook(module, args, out):
            captured[key] = out

        return hook

    hooks = [arch.final_norm.register_forward_hook(capture("final"))]
    hooks += [module.register_forward_hook(capture(key)) for key, module in levels.items()]
    hooks += [module.register_forward_hook(hook) for module, hook in edits]
    try:
        arch.model(image)
    finally:
        for handle in hooks:
            handle.remove()
    return captured


def _absolute(index: int, depth: int) -> int:
    if not -depth <= index < depth:
        raise ValueError(f"student level {index} is out of range for a student with {depth} blocks")
    return index % depth


def build_student(cfg: Config) -> Student:
    """Create the timm backbone the config names (random init: pretraining starts from scratch)."""
    import timm

    kwargs = {"num_classes": 0, "drop_path_rate": cfg.model.drop_path_rate, "img_size": cfg.data.image_size}
    kwargs.update(cfg.model.student_args)
    try:
        backbone = timm.create_model(cfg.model.student, pretrained=False, **kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ConfigError(
                f"model.student={cfg.model.student!r} is not a timm model; pick one from timm.list_models()"
            ) from err
        raise
    except (TypeError, AssertionError, ValueError) as err:
        raise ConfigError(
            f"model.student={cfg.model.student!r} cannot be built with data.image_size={cfg.data.image_size} "
            f"and model.student_args={cfg.model.student_args}: {err}"
        ) from err
    if cfg.model.pos_embed_init in ("sincos", "sincos_frozen"):
        init_sincos_pos_embed(backbone, cfg.model.student)
    if cfg.model.pos_embed_init == "sincos_frozen":  # MAE / MaskAlign: a fixed table, never optimised
        backbone.pos_embed.requires_grad_(False)
    use_fused_window_attention(backbone)
    return Student(backbone)


def use_fused_window_attention(backbone: nn.Module) -> int:
    """Swin (v1) window attention through torch's fused SDPA, with the relative position bias and shift mask as
    its additive mask (timm has the path but enables it only under TIMM_FUSED_ATTN=2; same result within float
    rounding, tested). SwinV2's scaled cosine attention has no fused path. TIMM_FUSED_ATTN=0 keeps timm's choice.
    Returns how many attention modules were switched."""
    import os

    if os.environ.get("TIMM_FUSED_ATTN") == "0":
        return 0
    switched = 0
    for module in backbone.modules():
        if type(module).__name__ == "WindowAttention" and getattr(module, "fused_attn", True) is False:
            module.fused_attn = True
            switched += 1
    return switched


def mae_sincos_table(dim: int, grid: tuple[int, int]) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos table, [h * w, dim] (facebookresearch/mae util/pos_embed.py, row-major tokens).

    Channel layout as MAE: the first half encodes the column (x), the second the row (y), each as [sin | cos] over
    frequencies 1 / 10000^(k / (dim / 4)). timm's build_sincos2d_pos_embed holds the same values in another
    channel order (row first, sines of both axes first), so a timm-built table is not MAE's channel for channel.
    """
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos table needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.meshgrid(
        torch.arange(grid[0], dtype=torch.float64), torch.arange(grid[1], dtype=torch.float64), indexing="ij"
    )

    def axis(positions: torch.Tensor) -> torch.Tensor:
        angles = positions.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([axis(cols), axis(rows)], dim=1).float()


@torch.no_grad()
def frozen_table_difference(pos_embed: torch.Tensor, grid: tuple[int, int], atol: float = 1e-2) -> str | None:
    """None when a ViT's whole [prefix + h * w, C] position table is MAE's fixed table for ``grid`` with zero
    prefix (class-token) rows, as ``init_sincos_pos_embed`` makes it (within ``atol``: a bf16 copy rounds it by up
    to ~4e-3); else what it is: timm's channel order (what mimscale built before the MAE preset) or another table."""
    pos_embed = pos_embed.detach().float().reshape(-1, pos_embed.shape[-1])
    table = mae_sincos_table(pos_embed.shape[-1], grid)
    prefix = pos_embed.shape[0] - table.shape[0]
    if prefix < 0:
        return f"of another shape ({tuple(pos_embed.shape)} for a {grid[0]}x{grid[1]} grid)"
    if torch.allclose(pos_embed[prefix:], table, atol=atol) and not pos_embed[:prefix].abs().gt(atol).any():
        return None
    from timm.layers import build_sincos2d_pos_embed

    timm_order = build_sincos2d_pos_embed(list(grid), dim=pos_embed.shape[-1]).reshape(table.shape)
    if torch.allclose(pos_embed[prefix:], timm_order, atol=atol):
        return "the 2-D sin-cos table in timm's channel order (row first, sines first: mimscale before the MAE preset)"
    return "another table than the 2-D sin-cos one"


@torch.no_grad()
def init_sincos_pos_embed(backbone: nn.Module, name: str = "student") -> None:
    """Fill a timm ViT's learned position embedding with MAE's 2-D sin-cos table; class-token rows get zeros.

    Only the initial values change: the parameter stays where timm keeps it (exports load in plain timm) and learned.
    """
    pos_embed = getattr(backbone, "pos_embed", None)
    family = find_family(backbone)
    if family is None or family.layout != "tokens" or pos_embed is None:
        raise ConfigError(
            f"model.pos_embed_init=sincos needs a ViT with a learned position embedding; {name} has none "
            "(Swin uses relative position biases): leave model.pos_embed_init at timm"
        )
    table = mae_sincos_table(pos_embed.shape[-1], as_pair(backbone.patch_embed.grid_size))
    prefix = pos_embed.shape[1] - table.shape[0]
    pos_embed.zero_()
    pos_embed[0, prefix:] = table.to(pos_embed.dtype)
