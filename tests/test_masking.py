"""Mask generators: exact masked counts, SimMIM cell alignment, determinism from the seed alone."""

import math

import numpy as np
import pytest

from mimscale.data.masking import BlockwiseMask, build_mask_generator


def test_simmim_cells_exact_ratio_and_alignment():
    # Swin-B at 192 px: 48x48 token grid, 32-px cells = 8x8 tokens, 36 cells, ceil(0.6*36)=22 masked.
    gen = build_mask_generator("random_cells", image_size=192, token_stride=4, ratio=0.6, cell_size=32)
    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = gen(rng)
        assert mask.shape == (48, 48) and mask.dtype == bool
        cells = mask.reshape(6, 8, 6, 8)
        # every 8x8 cell is all masked or all visible
        assert np.all(cells.all(axis=(1, 3)) == cells.any(axis=(1, 3)))
        assert cells.all(axis=(1, 3)).sum() == math.ceil(0.6 * 36)
        assert mask.sum() == gen.num_masked == 22 * 64


def test_vit_cells_cover_two_by_two_tokens():
    gen = build_mask_generator("random_cells", image_size=224, token_stride=16, ratio=0.6, cell_size=32)
    mask = gen(np.random.default_rng(1))
    assert mask.shape == (14, 14)
    blocks = mask.reshape(7, 2, 7, 2)
    assert np.all(blocks.all(axis=(1, 3)) == blocks.any(axis=(1, 3)))


@pytest.mark.parametrize("kind", ["random_tokens", "blockwise"])
@pytest.mark.parametrize("ratio", [0.4, 0.75])
def test_token_masks_have_exact_counts(kind, ratio):
    gen = build_mask_generator(kind, image_size=224, token_stride=16, ratio=ratio, cell_size=32)
    rng = np.random.default_rng(3)
    counts = {int(gen(rng).sum()) for _ in range(30)}
    assert counts == {round(196 * ratio)}


def test_blockwise_masks_are_blocky():
    """Block-wise masks have far fewer masked/visible boundaries than random ones at the same count."""
    rng = np.random.default_rng(0)
    block = BlockwiseMask(grid=14, ratio=0.4)
    random_gen = build_mask_generator("random_tokens", image_size=224, token_stride=16, ratio=0.4, cell_size=32)

    def edges(mask):
        return int((mask[1:] != mask[:-1]).sum() + (mask[:, 1:] != mask[:, :-1]).sum())

    block_edges = np.mean([edges(block(rng)) for _ in range(20)])
    random_edges = np.mean([edges(random_gen(rng)) for _ in range(20)])
    assert block_edges < 0.6 * random_edges


def test_same_seed_same_mask_different_seed_different_mask():
    gen = build_mask_generator("random_cells", image_size=64, token_stride=8, ratio=0.6, cell_size=16)
    a, b = gen(np.random.default_rng(42)), gen(np.random.default_rng(42))
    c = gen(np.random.default_rng(43))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_misaligned_cells_are_a_clear_error():
    with pytest.raises(ValueError, match="multiple of the student patch size"):
        build_mask_generator("random_cells", image_size=192, token_stride=16, ratio=0.6, cell_size=24)
    with pytest.raises(ValueError, match="unknown mask.kind"):
        build_mask_generator("spiral", image_size=192, token_stride=16, ratio=0.6, cell_size=32)
