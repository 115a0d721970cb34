"""Block-wise (BEiT Alg. 1) and space-time cube / tube masking: budget, blocks, determinism."""
import pytest
import torch

from models.masking import block_mask


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _union(blocks, grid):
    T, H, W = grid
    m = torch.zeros(T, H, W, dtype=torch.bool)
    for front, top, left, dt, bh, bw in blocks:
        assert 0 <= front and front + dt <= T and 0 <= top and top + bh <= H and 0 <= left and left + bw <= W
        m[front:front + dt, top:top + bh, left:left + bw] = True
    return m.reshape(-1)


@pytest.mark.parametrize("grid", [(14, 14), (4, 4), (6, 6), (3, 5), (2, 2)])
def test_image_masks_are_unions_of_blocks_within_budget(grid):
    masks, blocks = block_mask(400, grid, 0.4, generator=_gen(), return_blocks=True)
    L = grid[0] * grid[1]
    budget = round(0.4 * L)
    counts = masks.sum(1)
    assert masks.shape == (400, L) and masks.dtype == torch.bool
    assert int(counts.max()) <= budget                                    # never above ratio * L
    assert float(counts.float().mean()) >= 0.98 * budget and int(counts.min()) >= 0.75 * budget
    for m, bl in zip(masks, blocks):
        assert torch.equal(m, _union(bl, (1, *grid)))                     # exactly the blocks placed
        for *_, dt, bh, bw in bl:
            assert dt == 1 and max(bh / bw, bw / bh) <= 5                 # aspect in [0.3, 3.3] up to rounding


def test_blocks_are_large_on_a_14x14_grid():
    """BEiT's minimum block area is 16 tokens: at 14 x 14 (budget 78) masks are a few big blocks."""
    masks, blocks = block_mask(300, (14, 14), 0.4, generator=_gen(1), return_blocks=True)
    assert sum(len(bl) for bl in blocks) / 300 < 8                        # ~78 tokens in a handful of blocks
    assert min(bl[0][4] * bl[0][5] for bl in blocks) >= 14                # the first block: area >= 16 (rounded)
    tall = sum(bh > bw for bl in blocks for *_, bh, bw in bl)
    wide = sum(bw > bh for bl in blocks for *_, bh, bw in bl)
    assert tall > 50 and wide > 50                                        # both aspect directions drawn


def test_masks_are_a_function_of_the_generator_seed():
    a = block_mask(16, (14, 14), 0.4, generator=_gen(3))
    assert torch.equal(a, block_mask(16, (14, 14), 0.4, generator=_gen(3)))
    assert not torch.equal(a, block_mask(16, (14, 14), 0.4, generator=_gen(4)))
    assert not torch.equal(a[0], a[1])                                    # per-sample masks differ


def test_video_cubes_span_consecutive_frames_within_budget():
    grid = (4, 6, 6)
    masks, blocks = block_mask(200, grid, 0.4, generator=_gen(), return_blocks=True)
    budget = round(0.4 * 144)
    assert int(masks.sum(1).max()) <= budget and float(masks.sum(1).float().mean()) >= 0.97 * budget
    extents = set()
    for m, bl in zip(masks, blocks):
        assert torch.equal(m, _union(bl, grid))
        extents |= {dt for _, _, _, dt, _, _ in bl}
    assert extents == {1, 2, 3, 4}                                       # cubes of every temporal extent


def test_video_tubes_repeat_one_spatial_mask_over_time():
    masks = block_mask(50, (4, 6, 6), 0.4, generator=_gen(), tube=True).view(50, 4, 36)  # (B, t, h*w)
    assert torch.equal(masks, masks[:, :1].expand(-1, 4, -1))
    assert int(masks.sum((1, 2)).max()) <= round(0.4 * 144) and int(masks[:, 0].sum(1).min()) >= 10


@pytest.mark.parametrize("kw, match", [(dict(grid=(14,), ratio=0.4), "grid"), (dict(grid=(14, 14), ratio=1.0), "ratio"),
                                       (dict(grid=(0, 14), ratio=0.4), "grid"),
                                       (dict(grid=(14, 14), ratio=0.4, min_aspect=2.0), "min_aspect")])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        block_mask(2, **kw)
