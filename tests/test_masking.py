"""Mask generators: exact masked counts, SimMIM cell alignment, determinism from the seed alone."""

import math

import numpy as np
import pytest

from mimscale.pipeline.masking import BlockwiseMask, build_mask_generator


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
    # random_tokens keeps MAE's / MaskAlign's len_keep = int(L * (1 - ratio)); blockwise masks round(L * ratio)
    assert counts == {196 - int(196 * (1 - ratio)) if kind == "random_tokens" else round(196 * ratio)}


def beit2_masking_generator(rng, height, num_masking_patches, min_num_patches=16, min_aspect=0.3):
    """microsoft/unilm beit2/masking_generator.py MaskingGenerator, step by step, with its two random sources
    (python ``random`` and ``np.random``) replaced by one numpy Generator called in the same order."""
    width = height
    max_num_patches = num_masking_patches
    log_aspect_ratio = (math.log(min_aspect), math.log(1 / min_aspect))
    mask = np.zeros((height, width), dtype=np.int32)

    def uniform(a, b):  # python's random.uniform
        return a + (b - a) * rng.random()

    def place(max_mask_patches):
        delta = 0
        for _attempt in range(10):
            target_area = uniform(min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(uniform(*log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < width and h < height:
                top = rng.integers(0, height - h + 1)  # random.randint(0, height - h): inclusive
                left = rng.integers(0, width - w + 1)
                num_masked = mask[top : top + h, left : left + w].sum()
                if 0 < h * w - num_masked <= max_mask_patches:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if mask[i, j] == 0:
                                mask[i, j] = 1
                                delta += 1
                if delta > 0:
                    break
        return delta

    mask_count = 0
    while mask_count < num_masking_patches:
        delta = place(min(num_masking_patches - mask_count, max_num_patches))
        if delta == 0:
            break
        mask_count += delta
    if mask_count < num_masking_patches:
        mask_x, mask_y = (mask == 0).nonzero()
        to_mask = rng.choice(mask_x.shape[0], num_masking_patches - mask_count, replace=False)
        mask[mask_x[to_mask], mask_y[to_mask]] = 1
    return mask.astype(bool)


def test_blockwise_mask_is_beit2s_generator():
    """Same random stream, same masks as BEiT v2's MaskingGenerator with its pretraining setting (75 of 196)."""
    ours = BlockwiseMask(grid=14, ratio=0.4, count=75)
    for seed in range(300):
        mask = ours(np.random.default_rng(seed))
        assert np.array_equal(mask, beit2_masking_generator(np.random.default_rng(seed), 14, 75)), seed
        assert mask.sum() == 75


def test_preset_counts_match_the_references():
    from pathlib import Path

    from mimscale.config import load_config
    from mimscale.methods import resolve_preset
    from mimscale.pipeline.masking import mask_generator_for

    configs = Path(__file__).resolve().parents[1] / "configs"

    class Grid:  # the method's token stride is all mask_generator_for needs besides the config
        def __init__(self, cfg):
            self.mask_kind, self.token_stride = resolve_preset(cfg).mask_kind, 16

    distill = load_config(configs / "maskdistill_vit_base_clip_b16.yaml")
    align = load_config(configs / "maskalign_vit_base_clip_b16.yaml")
    assert mask_generator_for(distill, Grid(distill)).num_masked == 75  # BEiT v2 --num_mask_patches 75
    align_kind = "random_tokens"  # attention-guided masks take their count from the data mask
    align_gen = build_mask_generator(align_kind, image_size=224, token_stride=16, ratio=align.mask.ratio, cell_size=16)
    assert 196 - align_gen.num_masked == int(196 * (1 - 0.7)) == 58  # MaskAlign's len_keep


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
