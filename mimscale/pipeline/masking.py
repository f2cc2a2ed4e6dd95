"""Mask generators. They run in DataLoader workers and return a boolean grid over the student's tokens.

Every generator masks an exact number of tokens, so a batch can be stacked and a visible-only student sees
the same number of tokens in every sample. Randomness comes only from the ``numpy.random.Generator``
passed in, which the stream seeds from (seed, epoch, sample id): masks do not depend on worker count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MASK_KINDS = ("random_cells", "blockwise", "random_tokens")


@dataclass(frozen=True)
class RandomCellMask:
    """SimMIM: mask ``ceil(ratio * cells)`` random cells of ``cell_tokens`` x ``cell_tokens`` tokens.

    With 32-px cells and a 4-px Swin patch a cell is 8x8 tokens; with a 16-px ViT patch it is 2x2.
    """

    grid: int
    cell_tokens: int
    ratio: float

    def __post_init__(self):
        if self.grid % self.cell_tokens:
            raise ValueError(
                f"the token grid ({self.grid}) is not a multiple of the mask cell ({self.cell_tokens} tokens); "
                "choose mask.patch_size so that data.image_size / mask.patch_size is an integer"
            )

    @property
    def num_masked(self) -> int:
        cells = (self.grid // self.cell_tokens) ** 2
        return math.ceil(cells * self.ratio) * self.cell_tokens**2

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        side = self.grid // self.cell_tokens
        count = math.ceil(side * side * self.ratio)
        cells = np.zeros(side * side, dtype=bool)
        cells[rng.permutation(side * side)[:count]] = True
        cells = cells.reshape(side, side)
        return cells.repeat(self.cell_tokens, axis=0).repeat(self.cell_tokens, axis=1)


@dataclass(frozen=True)
class RandomTokenMask:
    """MAE-style random tokens: keep exactly ``int(tokens * (1 - ratio))`` (MAE's and MaskAlign's ``len_keep``:
    58 of 196 at ratio 0.7), or mask exactly ``count`` tokens when given."""

    grid: int
    ratio: float
    count: int = 0

    @property
    def num_masked(self) -> int:
        tokens = self.grid * self.grid
        return self.count or tokens - int(tokens * (1 - self.ratio))

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        flat = np.zeros(self.grid * self.grid, dtype=bool)
        flat[rng.permutation(flat.size)[: self.num_masked]] = True
        return flat.reshape(self.grid, self.grid)


@dataclass(frozen=True)
class BlockwiseMask:
    """BEiT / BEiT v2 / MaskDistill block-wise masking of exactly ``count`` tokens (BEiT v2: 75 of 196), or
    ``round(ratio * tokens)`` when no count is given.

    The same procedure as BEiT v2's MaskingGenerator (min 16 tokens per block, aspect in [0.3, 1/0.3], at most
    10 attempts per block, the shortfall topped up with random tokens), drawing from one numpy Generator in the
    same order, so equal random streams give equal masks (tests/test_masking.py checks it against the formula).
    """

    grid: int
    ratio: float
    count: int = 0
    min_block: int = 16
    min_aspect: float = 0.3

    @property
    def num_masked(self) -> int:
        return self.count or int(round(self.grid * self.grid * self.ratio))

    def _place_block(self, mask: np.ndarray, budget: int, rng: np.random.Generator) -> int:
        log_aspect = (math.log(self.min_aspect), math.log(1 / self.min_aspect))
        for _ in range(10):
            # python's random.uniform(a, b) = a + (b - a) * random(), as BEiT draws it (b < a near the end)
            area = self.min_block + (budget - self.min_block) * rng.random()
            aspect = math.exp(log_aspect[0] + (log_aspect[1] - log_aspect[0]) * rng.random())
            h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if not (h < self.grid and w < self.grid):
                continue
            top, left = rng.integers(0, self.grid - h + 1), rng.integers(0, self.grid - w + 1)
            window = mask[top : top + h, left : left + w]
            new = int((~window).sum())
            if 0 < new <= budget:
                window[:] = True
                return new
        return 0

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        mask = np.zeros((self.grid, self.grid), dtype=bool)
        target = self.num_masked
        count = 0
        while count < target:
            added = self._place_block(mask, target - count, rng)
            if added == 0:
                break
            count += added
        if count < target:  # top up so the masked count is exact (blocks never overshoot: new <= budget)
            free = np.flatnonzero(~mask.ravel())
            mask.ravel()[free[rng.choice(free.size, size=target - count, replace=False)]] = True
        return mask


def build_mask_generator(
    kind: str, *, image_size: int, token_stride: int, ratio: float, cell_size: int, count: int = 0
):
    """Build a mask generator over the student's token grid.

    ``token_stride`` is the student's input patch size in pixels (16 for ViT-B/16, 4 for Swin);
    ``cell_size`` is the masking cell in pixels (SimMIM: 32), used by ``random_cells`` only; ``count`` (> 0) is an
    exact number of masked tokens for ``blockwise`` and ``random_tokens`` (0 = from ``ratio``).
    """
    if image_size % token_stride:
        raise ValueError(f"data.image_size={image_size} is not a multiple of the student patch size {token_stride}")
    grid = image_size // token_stride
    if not 0 <= count < grid * grid:
        raise ValueError(f"mask.count={count} must be in [0, {grid * grid}) for a {grid}x{grid} token grid")
    if kind == "random_cells":
        if count:
            raise ValueError("mask.count is for blockwise and random_tokens masks; random_cells uses mask.ratio")
        if cell_size % token_stride:
            raise ValueError(
                f"mask.patch_size={cell_size} is not a multiple of the student patch size {token_stride}; "
                "use a multiple so each mask cell covers whole tokens"
            )
        return RandomCellMask(grid=grid, cell_tokens=cell_size // token_stride, ratio=ratio)
    if kind == "random_tokens":
        return RandomTokenMask(grid=grid, ratio=ratio, count=count)
    if kind == "blockwise":
        return BlockwiseMask(grid=grid, ratio=ratio, count=count)
    raise ValueError(f"unknown mask.kind '{kind}'; choose one of {', '.join(MASK_KINDS)}")


def mask_generator_for(cfg, method):
    """The generator the data workers use for ``method`` under ``cfg`` (its mask kind on its token grid)."""
    return build_mask_generator(
        method.mask_kind,
        image_size=cfg.data.image_size,
        token_stride=method.token_stride,
        ratio=cfg.mask.ratio,
        cell_size=cfg.mask.patch_size,
        count=cfg.mask.count,
    )
