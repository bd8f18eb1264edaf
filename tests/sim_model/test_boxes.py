"""The one rasterisation convention (sim_model.boxes): NumPy bounds, torch masks (full and on a grid), tight boxes."""
import numpy as np
import torch

from sim_model.boxes import box_masks, box_pixel_bounds, mask_boxes, visible_box_share


def _random_boxes(n, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * torch.tensor([w, h], dtype=torch.float32) - 3
    return torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 15 + 0.2], dim=1)


def test_box_masks_and_mask_boxes():
    m = box_masks(torch.tensor([[1.0, 2.0, 4.0, 5.0], [0.0, 0.0, 10.0, 10.0]]), 6, 8)
    assert m.shape == (2, 6, 8) and m.dtype == torch.bool
    assert m[0].sum() == 9 and m[0, 2:5, 1:4].all()
    assert m[1].all()
    torch.testing.assert_close(mask_boxes(m), torch.tensor([[1.0, 2.0, 4.0, 5.0], [0.0, 0.0, 8.0, 6.0]]))
    assert mask_boxes(m[:0]).shape == (0, 4)
    torch.testing.assert_close(mask_boxes(m[0].numpy()[None]), torch.tensor([[1.0, 2.0, 4.0, 5.0]]))


def test_batched_masks_cover_the_pixels_of_box_pixel_bounds():
    """Fractional boxes, partly outside the image: torch masks = the NumPy bounds every engine uses."""
    for b, m in zip(_random_boxes(30, 20, 30), box_masks(_random_boxes(30, 20, 30), 20, 30)):
        c0, r0, c1, r1 = box_pixel_bounds(b.numpy(), (20, 30))
        ref = np.zeros((20, 30), bool)
        ref[r0:r1, c0:c1] = True
        assert np.array_equal(m.numpy(), ref), b


def test_grid_masks_sample_the_full_masks_at_pixel_centres():
    boxes = torch.cat([_random_boxes(20, 32, 40, seed=3), torch.tensor([[3.7, 5.2, 20.9, 14.0],
                                                                        [0.0, 0.0, 31.0, 8.0]])])
    full = box_masks(boxes, 32, 40)
    grid = box_masks(boxes, 32, 40, stride=4)
    assert grid.shape == (len(boxes), 8, 10)
    assert torch.equal(grid, full[:, 2::4, 2::4])
    # the box [0, 0, 31, 8] covers columns 0..30 and rows 0..7: column 30 is a sample centre, row 8 is not covered
    assert grid[-1, :2, :8].all() and not grid[-1, 2:].any() and grid[-1, 0, 7]


def test_visible_box_share_is_the_area_inside_the_view():
    boxes = np.array([[10, 10, 30, 20],     # inside
                      [-10, 0, 10, 10],     # half cut on the left
                      [90, 40, 110, 60],    # a quarter inside the bottom-right corner
                      [120, 0, 130, 10],    # outside
                      [5, 5, 5, 9]], np.float32)  # empty
    share = visible_box_share(boxes, (50, 100))
    assert share.dtype == torch.float32
    np.testing.assert_allclose(share.numpy(), [1.0, 0.5, 0.25, 0.0, 1.0])
