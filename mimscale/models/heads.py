"""Heads: map student features to the method's target space (pixels, teacher features, a projection)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mimscale.models.students import mae_sincos_table


class LinearPixelHead(nn.Module):
    """ViT SimMIM decoder: one linear layer per token to ``stride^2 * 3`` pixels, laid out as an image."""

    def __init__(self, in_dim: int, stride: int, channels: int = 3):
        super().__init__()
        self.stride = stride
        self.proj = nn.Linear(in_dim, stride * stride * channels)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, N, C] tokens of a square grid -> [B, 3, H, W] image."""
        batch, count, _ = tokens.shape
        side = math.isqrt(count)
        if side * side != count:
            raise ValueError(f"LinearPixelHead needs a square token grid, got {count} tokens")
        x = self.proj(tokens).transpose(1, 2).reshape(batch, -1, side, side)
        return F.pixel_shuffle(x, self.stride)


class PixelShuffleHead(nn.Module):
    """Swin SimMIM decoder: 1x1 conv to ``stride^2 * 3`` channels, then PixelShuffle back to full resolution."""

    def __init__(self, in_dim: int, stride: int, channels: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(in_dim, stride * stride * channels, kernel_size=1)
        self.shuffle = nn.PixelShuffle(stride)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[B, h, w, C] (NHWC, as timm Swin returns) -> [B, 3, h*stride, w*stride]."""
        return self.shuffle(self.conv(features.permute(0, 3, 1, 2)))


class TokenLinearHead(nn.Module):
    """Feature distillation head (MaskDistill): a linear map from student width to teacher width per token."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(tokens)


def identity_like_mixing(teacher_levels: Sequence[int], teacher_depth: int, student_depth: int) -> torch.Tensor:
    """Initial Dynamic Alignment weights: each teacher level starts from the student block at the same depth.

    Returns [T, S]: 1 at the student block whose relative depth matches the teacher block's, plus 0.01
    everywhere (MaskAlign initialises its fusion weights as identity + 0.01 so every level gets a gradient).
    """
    weights = torch.full((len(teacher_levels), student_depth), 0.01)
    for row, level in enumerate(teacher_levels):
        block = level % teacher_depth
        column = min(student_depth - 1, round((block + 1) * student_depth / teacher_depth) - 1)
        weights[row, max(column, 0)] += 1.0
    return weights


class DynamicAlignHead(nn.Module):
    """MaskAlign Dynamic Alignment: a learnable mix of all student levels per teacher level, then an adapter.

    ``forward(levels)`` takes the S student block outputs ([B, N, C_s] each) and returns T predictions
    ([B, N, C_t] each): ``pred[t] = adapter[t](sum_s mixing[t, s] * levels[s])``.
    """

    def __init__(
        self, student_dim: int, student_depth: int, teacher_dim: int, teacher_levels: Sequence[int], teacher_depth: int
    ):
        super().__init__()
        self.mixing = nn.Parameter(identity_like_mixing(teacher_levels, teacher_depth, student_depth))
        self.adapters = nn.ModuleList(nn.Linear(student_dim, teacher_dim) for _ in teacher_levels)

    def forward(self, levels: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(levels) != self.mixing.shape[1]:
            raise ValueError(f"DynamicAlignHead expects {self.mixing.shape[1]} student levels, got {len(levels)}")
        stacked = torch.stack(list(levels), dim=0)  # [S, B, N, C]
        mixed = torch.einsum("ts,sbnc->tbnc", self.mixing.to(stacked.dtype), stacked)
        return [adapter(mixed[t]) for t, adapter in enumerate(self.adapters)]


class ProjectionMLP(nn.Module):
    """RelaxMIM projector: Linear-BN-free MLP (LayerNorm + GELU) to a small embedding for InfoNCE."""

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 256):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.LayerNorm(hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MAEDecoder(nn.Module):
    """MAE's lightweight decoder (facebookresearch/mae ``forward_decoder``): embed the encoder's visible tokens to
    the decoder width, put its own mask token at every masked position, add its fixed 2-D sin-cos table, run
    ``depth`` ViT blocks on every token, and predict each patch's ``patch^2 * channels`` pixels.

    Parameter names are MAE's (``decoder_embed``, ``mask_token``, ``decoder_blocks``, ``decoder_norm``,
    ``decoder_pred``). The table is a non-persistent buffer: a pure function of the grid, rebuilt identically on
    load, and never in the optimizer (MAE freezes it).
    """

    def __init__(
        self,
        in_dim: int,
        grid: tuple[int, int],
        patch: int,
        *,
        prefix_tokens: int = 1,
        channels: int = 3,
        width: int = 512,
        depth: int = 8,
        heads: int = 16,
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        from timm.models.vision_transformer import Block  # timm's ViT block, as MAE's decoder uses

        self.prefix_tokens = prefix_tokens
        self.num_patches = grid[0] * grid[1]
        self.decoder_embed = nn.Linear(in_dim, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        table = torch.cat([torch.zeros(prefix_tokens, width), mae_sincos_table(width, grid)])
        self.register_buffer("decoder_pos_embed", table.unsqueeze(0), persistent=False)
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.decoder_blocks = nn.ModuleList(
            Block(width, heads, mlp_ratio, qkv_bias=True, norm_layer=norm) for _ in range(depth)
        )
        self.decoder_norm = norm(width)
        self.decoder_pred = nn.Linear(width, patch * patch * channels)
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each decoder block in backward, as the student's blocks are."""
        self.grad_checkpointing = enable

    def forward(self, latent: torch.Tensor, keep_index: torch.Tensor) -> torch.Tensor:
        """[B, prefix + K, C] encoder output (prefix tokens first, then the K kept patches in ``keep_index`` [B, K]
        order) -> [B, N, patch^2 * channels] predictions for every patch in grid order (prefix dropped)."""
        x = self.decoder_embed(latent)
        prefix, visible = x[:, : self.prefix_tokens], x[:, self.prefix_tokens :]
        batch, _, width = visible.shape
        every = self.mask_token.to(x.dtype).expand(batch, self.num_patches, width)
        every = every.scatter(1, keep_index.unsqueeze(-1).expand(-1, -1, width), visible)  # MAE's unshuffle
        x = torch.cat([prefix, every], dim=1) + self.decoder_pos_embed.to(x.dtype)
        for block in self.decoder_blocks:
            recompute = self.grad_checkpointing and torch.is_grad_enabled()
            x = checkpoint(block, x, use_reentrant=False) if recompute else block(x)  # as timm checkpoints its blocks
        return self.decoder_pred(self.decoder_norm(x))[:, self.prefix_tokens :]


@torch.no_grad()
def init_like_mae(module: nn.Module) -> None:
    """MAE's ``initialize_weights`` (fixed position tables are left alone): every Linear xavier-uniform with zero
    bias, LayerNorms 1 / 0, the patch-embedding conv xavier-uniform as a Linear on its flattened kernel, class and
    mask tokens normal(std 0.02)."""
    for name, child in module.named_modules():
        if isinstance(child, nn.Linear):
            nn.init.xavier_uniform_(child.weight)
            if child.bias is not None:
                nn.init.zeros_(child.bias)
        elif isinstance(child, nn.LayerNorm) and child.weight is not None:
            nn.init.ones_(child.weight)
            nn.init.zeros_(child.bias)
        elif isinstance(child, nn.Conv2d) and name.endswith("patch_embed.proj"):
            nn.init.xavier_uniform_(child.weight.view(child.weight.shape[0], -1))
    for name, param in module.named_parameters():
        if name.rsplit(".", 1)[-1] in ("cls_token", "mask_token"):
            nn.init.normal_(param, std=0.02)
