"""What mimscale needs to know about a timm backbone's structure, answered in one place for every family.

Students, the training loop, the planner, the probes and the analysis all ask the same questions of a timm
model: its blocks in order, its patch size, its token grid, the width of each level, whether it lays tokens out as
a sequence (ViT-like) or as an NHWC map (Swin-like), where a mask token can be applied and whether masked tokens
can be dropped. ``Backbone(model)`` answers them from one ``Family`` entry per timm architecture family; a new
family (e.g. timm's Beit) is one more entry in ``FAMILIES``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


class UnknownBackboneError(ValueError):
    """The model is not one of the timm families in ``FAMILIES``."""


@dataclass(frozen=True)
class Family:
    """How one timm architecture family is laid out.

    ``requires``: attributes that identify it (checked in ``FAMILIES`` order, first match wins).
    ``layout``: ``tokens`` ([B, prefix + N, C] sequences, ViT-like) or ``nhwc`` ([B, h, w, C] maps, Swin-like).
    ``levels``: the attribute holding the per-depth units a "level" index picks (ViT blocks, Swin stages).
    ``drop_point``: the submodule after which masked tokens can be dropped (after the position embedding), or
    None when the blocks need the full grid (windows, relative position tables).
    ``plain_attention``: every block's ``attn`` has a fused ``qkv`` Linear (timm's ViT ``Attention``, or Beit's with
    its q/v biases and relative position biases), so its attention map can be recomputed from the module's input.
    ``windowed_attention``: blocks attend within (shifted) windows, so whole-image attention maps do not exist.
    ``layer_decay``: the layer-wise lr decay the papers fine-tune this family with (SimMIM: 0.65 ViT, 0.9 Swin).
    """

    name: str
    requires: tuple[str, ...]
    layout: str
    levels: str
    drop_point: str | None
    plain_attention: bool
    windowed_attention: bool
    layer_decay: float


FAMILIES: tuple[Family, ...] = (
    Family(
        name="vit",
        requires=("patch_embed", "_pos_embed", "patch_drop", "blocks", "norm"),
        layout="tokens",
        levels="blocks",
        drop_point="patch_drop",
        plain_attention=True,
        windowed_attention=False,
        layer_decay=0.65,
    ),
    Family(
        # timm's Beit (BEiT, BEiT v2, the SimMIM / MaskDistill ViTs): no absolute position embedding when
        # use_abs_pos_emb=False, relative position biases (per block or one shared table) over the full grid,
        # so masked tokens cannot be dropped; its attention maps are recomputed with those biases.
        name="beit",
        requires=("patch_embed", "rel_pos_bias", "blocks", "norm", "cls_token"),
        layout="tokens",
        levels="blocks",
        drop_point=None,
        plain_attention=True,
        windowed_attention=False,
        layer_decay=0.65,
    ),
    Family(
        name="swin",  # SwinTransformer and SwinTransformerV2
        requires=("patch_embed", "layers", "norm", "feature_info"),
        layout="nhwc",
        levels="layers",
        drop_point=None,
        plain_attention=False,
        windowed_attention=True,
        layer_decay=0.9,
    ),
)


def find_family(model: nn.Module) -> Family | None:
    """The first family whose identifying attributes the model has (timm classifiers included), else None."""
    return next((f for f in FAMILIES if all(hasattr(model, attr) for attr in f.requires)), None)


def as_pair(size) -> tuple[int, int]:
    """timm keeps patch and grid sizes as an int or a pair; always a pair of ints."""
    if isinstance(size, (tuple, list)):
        return int(size[0]), int(size[-1])
    return int(size), int(size)


class Backbone:
    """A read-only view of a timm backbone's structure (the model itself is not changed or wrapped)."""

    def __init__(self, model: nn.Module):
        family = find_family(model)
        if family is None:
            known = ", ".join(f.name for f in FAMILIES)
            raise UnknownBackboneError(
                f"{type(model).__name__} is not a timm backbone mimscale knows (families: {known}); pick e.g. "
                "vit_base_patch16_224, swin_base_patch4_window7_224 or swinv2_base_window12_192"
            )
        self.model = model
        self.family = family

    @property
    def name(self) -> str:
        return self.family.name

    @property
    def is_vit_like(self) -> bool:
        """Tokens are a sequence [B, prefix + N, C] on the patch grid."""
        return self.family.layout == "tokens"

    @property
    def is_swin_like(self) -> bool:
        """Tokens are NHWC maps [B, h, w, C] that shrink stage by stage."""
        return self.family.layout == "nhwc"

    @property
    def kind(self) -> str:
        """``vit`` (sequence of tokens) or ``swin`` (NHWC maps): what methods and heads care about."""
        return "vit" if self.is_vit_like else "swin"

    @property
    def can_drop_tokens(self) -> bool:
        """Whether the blocks can run on the visible tokens only (MAE/MaskAlign-style)."""
        return self.family.drop_point is not None

    @property
    def drop_point(self) -> nn.Module:
        if self.family.drop_point is None:
            raise ValueError(f"{self.name} backbones cannot drop masked tokens (their blocks need the full grid)")
        return getattr(self.model, self.family.drop_point)

    @property
    def patch_embed(self) -> nn.Module:
        """Where a mask token replaces masked patch embeddings (output [B, N, C] or NHWC [B, h, w, C])."""
        return self.model.patch_embed

    @property
    def final_norm(self) -> nn.Module:
        return self.model.norm

    @property
    def patch_size(self) -> tuple[int, int]:
        return as_pair(self.model.patch_embed.patch_size)

    @property
    def patch(self) -> int:
        """The side of a square patch (every supported family has square patches)."""
        height, width = self.patch_size
        if height != width:
            raise ValueError(f"{type(self.model).__name__} has non-square patches {self.patch_size}")
        return height

    @property
    def image_size(self) -> int:
        """The input side the model is built for (timm keeps it on the patch embedding; square inputs)."""
        return as_pair(self.model.patch_embed.img_size)[0]

    def grid(self, image_size: int | None = None) -> tuple[int, int]:
        """Patch tokens per side: for ``image_size`` pixels, or the grid the model was built for."""
        if image_size is None:
            return as_pair(self.model.patch_embed.grid_size)
        return image_size // self.patch_size[0], image_size // self.patch_size[1]

    @property
    def levels(self) -> list[nn.Module]:
        """The units a level index picks: ViT blocks, Swin stages (each stage holds several blocks)."""
        return list(getattr(self.model, self.family.levels))

    @property
    def depth(self) -> int:
        return len(self.levels)

    @property
    def blocks(self) -> list[nn.Module]:
        """Every transformer block in order (Swin: the blocks of every stage); timm checkpoints these."""
        if self.family.levels == "blocks":
            return self.levels
        return [block for stage in self.levels for block in stage.blocks]

    @property
    def embed_dim(self) -> int:
        """Width of the patch embeddings (what a mask token must match)."""
        return int(self.model.patch_embed.proj.out_channels)

    @property
    def level_dims(self) -> list[int]:
        """Output width of every level (ViT: every block the same; Swin: per stage)."""
        if self.is_swin_like:
            return [int(info["num_chs"]) for info in self.model.feature_info]
        return [int(getattr(self.model, "embed_dim", self.embed_dim))] * self.depth

    @property
    def num_features(self) -> int:
        return int(self.model.num_features)

    @property
    def num_prefix_tokens(self) -> int:
        """Class/register tokens in front of the patch tokens (0 for NHWC maps)."""
        return int(getattr(self.model, "num_prefix_tokens", 0)) if self.is_vit_like else 0

    @property
    def has_class_token(self) -> bool:
        return self.num_prefix_tokens > 0 and getattr(self.model, "cls_token", None) is not None

    @property
    def out_stride(self) -> int:
        """Pixels per token of the final features (ViT: the patch; Swin: 32 after the merges)."""
        if self.is_swin_like:
            return int(self.model.feature_info[-1]["reduction"])
        return self.patch

    @property
    def plain_attention(self) -> bool:
        return self.family.plain_attention and all(hasattr(block, "attn") for block in self.blocks)

    @property
    def windowed_attention(self) -> bool:
        """Blocks attend within shifted windows (Swin): attention distances over the whole image do not apply."""
        return self.family.windowed_attention

    @property
    def layer_decay(self) -> float:
        """The layer-wise lr decay fine-tuning uses for this family by default."""
        return self.family.layer_decay
