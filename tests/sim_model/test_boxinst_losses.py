"""BoxInst losses and their preparation against brute-force versions on small tensors."""
import math

import pytest
import torch

from sim_model.losses.boxinst import (
    color_similarity,
    feature_similarity,
    pairwise_loss,
    pairwise_warmup_factor,
    pairwise_weights,
    prepare_boxinst_targets,
    projection_loss,
    rgb_to_lab,
    unfold_wo_center,
)


def _neighbour_offsets(k, d):
    r = k // 2
    return [(dy * d, dx * d) for dy in range(-r, r + 1) for dx in range(-r, r + 1) if (dy, dx) != (0, 0)]


def test_rgb_to_lab_known_colours():
    # reference values of the CIE LAB (D65) conversion, as given by skimage.color.rgb2lab
    colours = torch.tensor([[255, 255, 255], [0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255], [128, 128, 128]],
                           dtype=torch.float32)
    expected = torch.tensor([[100.0, 0.0, 0.0], [0.0, 0.0, 0.0], [53.24, 80.09, 67.20], [87.73, -86.18, 83.18],
                             [32.30, 79.19, -107.86], [53.59, 0.0, 0.0]])
    lab = rgb_to_lab(colours.t().reshape(1, 3, 1, 6))[0].reshape(3, 6).t()
    assert torch.allclose(lab, expected, atol=0.05), lab


def test_rgb_to_lab_is_batched_and_rejects_bad_shapes():
    x = torch.rand(3, 3, 5, 7) * 255
    lab = rgb_to_lab(x)
    assert lab.shape == x.shape
    assert torch.allclose(lab[1], rgb_to_lab(x[1:2])[0])
    with pytest.raises(ValueError):
        rgb_to_lab(torch.zeros(3, 5, 7))


def test_unfold_wo_center_matches_loops():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 9)
    out = unfold_wo_center(x, 3, 2)
    assert out.shape == (2, 3, 8, 7, 9)
    for j, (dy, dx) in enumerate(_neighbour_offsets(3, 2)):
        for y in range(7):
            for xx in range(9):
                yy, xn = y + dy, xx + dx
                ref = x[:, :, yy, xn] if 0 <= yy < 7 and 0 <= xn < 9 else torch.zeros(2, 3)
                assert torch.allclose(out[:, :, j, y, xx], ref)


def test_color_similarity_matches_brute_force():
    torch.manual_seed(1)
    lab = torch.randn(1, 3, 6, 8) * 10
    valid = torch.ones(1, 6, 8)
    valid[0, 5:] = 0  # a removed bottom row
    sim = color_similarity(lab, valid, 3, 2, sigma_scale=0.5)
    for j, (dy, dx) in enumerate(_neighbour_offsets(3, 2)):
        for y in range(6):
            for x in range(8):
                yy, xx = y + dy, x + dx
                inside = 0 <= yy < 6 and 0 <= xx < 8
                if not inside or valid[0, yy, xx] == 0 or valid[0, y, x] == 0:
                    ref = 0.0
                else:
                    ref = math.exp(-float(torch.norm(lab[0, :, y, x] - lab[0, :, yy, xx])) * 0.5)
                assert abs(float(sim[0, j, y, x]) - ref) < 1e-5


def test_feature_similarity_matches_brute_force():
    torch.manual_seed(3)
    z = torch.nn.functional.normalize(torch.randn(1, 4, 5, 6), dim=1)
    sim = feature_similarity(z, 3, 2)
    assert sim.shape == (1, 8, 5, 6)
    for j, (dy, dx) in enumerate(_neighbour_offsets(3, 2)):
        for y in range(5):
            for x in range(6):
                yy, xx = y + dy, x + dx
                other = z[0, :, yy, xx] if (0 <= yy < 5 and 0 <= xx < 6) else torch.zeros(4)  # zero padding
                ref = math.exp(-float(torch.norm(z[0, :, y, x] - other)))
                assert abs(float(sim[0, j, y, x]) - ref) < 1e-5


def _dice_loss(x, t):
    x, t = x.flatten(), t.flatten()
    return 1 - 2 * (x * t).sum() / ((x * x).sum() + (t * t).sum() + 1e-5)


def test_projection_loss_matches_brute_force():
    torch.manual_seed(2)
    logits = torch.randn(3, 1, 6, 5)
    boxes = torch.zeros(3, 1, 6, 5)
    boxes[0, 0, 1:4, 2:5] = 1
    boxes[1, 0, :, :] = 1
    boxes[2, 0, 5, 0] = 1
    loss = projection_loss(logits, boxes)
    p = logits.sigmoid()
    ref = 0.0
    for i in range(3):
        py = torch.tensor([float(p[i, 0, :, x].max()) for x in range(5)])
        by = torch.tensor([float(boxes[i, 0, :, x].max()) for x in range(5)])
        px = torch.tensor([float(p[i, 0, y, :].max()) for y in range(6)])
        bx = torch.tensor([float(boxes[i, 0, y, :].max()) for y in range(6)])
        ref += float(_dice_loss(py, by) + _dice_loss(px, bx))
    assert abs(float(loss) - ref / 3) < 1e-5


def test_projection_loss_is_zero_for_the_box_itself_and_empty_safe():
    box = torch.zeros(1, 1, 8, 8)
    box[0, 0, 2:6, 1:7] = 1
    logits = torch.where(box > 0, torch.tensor(30.0), torch.tensor(-30.0))
    assert float(projection_loss(logits, box)) < 1e-4
    empty = torch.zeros(0, 1, 8, 8, requires_grad=True)
    out = projection_loss(empty, torch.zeros(0, 1, 8, 8))
    assert float(out) == 0.0 and out.requires_grad


def test_pairwise_loss_matches_brute_force():
    torch.manual_seed(3)
    logits = torch.randn(2, 1, 5, 6)
    sim = torch.rand(2, 8, 5, 6)
    box = torch.zeros(2, 1, 5, 6)
    box[0, 0, 1:4, 1:5] = 1
    box[1, 0] = 1
    w = pairwise_weights(sim, box, 0.3)
    loss = pairwise_loss(logits, w, 3, 2)
    p = logits.sigmoid()
    num, den = 0.0, 0.0
    for i in range(2):
        for j, (dy, dx) in enumerate(_neighbour_offsets(3, 2)):
            for y in range(5):
                for x in range(6):
                    if not (sim[i, j, y, x] >= 0.3 and box[i, 0, y, x] > 0):
                        continue
                    yy, xx = y + dy, x + dx
                    # outside the image the neighbour's logit is the zero padding of the log-probs
                    if 0 <= yy < 5 and 0 <= xx < 6:
                        pj = float(p[i, 0, yy, xx])
                        same = float(p[i, 0, y, x]) * pj + (1 - float(p[i, 0, y, x])) * (1 - pj)
                    else:
                        # zero-padded log-probabilities: P(same) = p_i + (1 - p_i) = 1, no loss
                        same = float(p[i, 0, y, x]) + (1 - float(p[i, 0, y, x]))
                    num += -math.log(same)
                    den += 1
    assert abs(float(loss) - num / max(den, 1.0)) < 1e-4


def test_pairwise_loss_prefers_smooth_masks():
    w = torch.ones(1, 8, 6, 6)
    smooth = torch.full((1, 1, 6, 6), 5.0)
    checker = torch.tensor([[5.0 if (y + x) % 2 else -5.0 for x in range(6)] for y in range(6)])[None, None]
    assert float(pairwise_loss(smooth, w, 3, 2)) < float(pairwise_loss(checker, w, 3, 1))


def test_pairwise_warmup_ramp():
    assert pairwise_warmup_factor(0, 100) == 0.0
    assert pairwise_warmup_factor(50, 100) == 0.5
    assert pairwise_warmup_factor(1000, 100) == 1.0
    assert pairwise_warmup_factor(3, 0) == 1.0


def test_prepare_boxinst_targets_shapes_and_padding():
    images = torch.zeros(2, 3, 32, 48)
    images[:, 0] = 200.0
    out = prepare_boxinst_targets(images, [(32, 48), (20, 24)], [torch.tensor([[4.0, 4.0, 20.0, 12.0]]),
                                                                  torch.zeros(0, 4)],
                                  stride=4, kernel_size=3, dilation=2, bottom_pixels_removed=0)
    assert out["box_masks"][0].shape == (1, 8, 12) and out["box_masks"][1].shape == (0, 8, 12)
    sim = out["color_similarity"]
    assert sim.shape == (2, 8, 8, 12)
    # uniform image: similarity 1 inside, 0 where the neighbour falls in the padding of image 2
    assert torch.allclose(sim[0, :, 2:6, 2:10], torch.ones(8, 4, 8))
    assert float(sim[1, :, 6:, :].max()) == 0.0 and float(sim[1, :, :, 7:].max()) == 0.0
