"""Heads: map student features to the method's target space (pixels, teacher features, a projection)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


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
