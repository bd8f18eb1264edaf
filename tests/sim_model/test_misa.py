"""MISA's equations (IJCAI 2024): Fourier masks and FSD (Eq. 3–6), SEPA (Eq. 8–15), the BSSS losses.

Synthetic tensors only: these are unit tests of equations (the ladder in docs/benchmarks.md is the
real-data check).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sim_model.boxes import mask_boxes
from sim_model.misa.bsss import semantic_box_losses, semantic_miou
from sim_model.misa.fsd import fourier_masks, frequency_split, fsd_loss
from sim_model.misa.sepa import (local_affinity, neighbour_offsets, propagate, sepa_affinity,
                                 sepa_loss, sepa_pseudo_labels)


# ---------------------------------------------------------------------------------------------- FSD
def test_low_and_high_pass_add_up_to_the_identity_when_theta_is_zero():
    high, low = fourier_masks(12, 16, theta=0.0, radius=3)
    assert torch.equal(high + low, torch.ones(12, 16))
    x = torch.randn(2, 5, 12, 16)
    f_high, f_low = frequency_split(x, theta=0.0, radius=3)
    assert torch.allclose(f_high + f_low, x, atol=1e-5)
    # with θ > 0 they add up to (1 + θ)·x, not x
    f_high, f_low = frequency_split(x, theta=0.2, radius=3)
    assert torch.allclose(f_high + f_low, 1.2 * x, atol=1e-5)


def test_the_radius_is_measured_in_the_centred_spectrum():
    high, low = fourier_masks(20, 20, theta=0.2, radius=3)
    c = 10  # zero frequency after fftshift
    assert high[c, c] == pytest.approx(0.2) and low[c, c] == 1.0
    assert high[c, c + 3] == pytest.approx(0.2)          # on the circle: inside (≤ t²)
    assert high[c + 3, c + 1] == 1.0 and low[c + 3, c + 1] == pytest.approx(0.2)  # 9 + 1 > 9: outside
    assert high[0, 0] == 1.0                              # the corners are the highest frequencies
    # the low pass keeps a constant map whole (its energy is at zero frequency), the high pass scales it by θ
    const = torch.full((1, 1, 20, 20), 3.0)
    f_high, f_low = frequency_split(const, theta=0.2, radius=3)
    assert torch.allclose(f_low, const, atol=1e-5) and torch.allclose(f_high, 0.2 * const, atol=1e-5)


def test_fsd_loss_matches_a_brute_force_version():
    g = torch.Generator().manual_seed(0)
    n, d, h, w = 2, 3, 6, 7
    s = torch.randn(n, d, h, w, generator=g)
    i = torch.randn(n, d, h, w, generator=g)
    b = torch.zeros(n, h, w)
    b[0, 1:4, 2:6] = 1
    b[1, 0:2, 0:3] = 1
    theta, t, lam_bg, lam_fg = 0.2, 2.0, 6.0, 10.0

    def split(x):  # NumPy, by the equations: centred FFT, α by Eq. 4 written out cell by cell
        a_high = np.ones((h, w))
        for y in range(h):
            for xx in range(w):
                if (y - h // 2) ** 2 + (xx - w // 2) ** 2 <= t * t:
                    a_high[y, xx] = theta
        a_low = np.where(a_high == 1.0, theta, 1.0)
        spec = np.fft.fftshift(np.fft.fft2(x, axes=(-2, -1)), axes=(-2, -1))
        back = lambda a: np.fft.ifft2(np.fft.ifftshift(spec * a, axes=(-2, -1)), axes=(-2, -1)).real  # noqa: E731
        return back(a_high), back(a_low)

    sh, sl = split(s.numpy().astype(np.float64))
    ih, il = split(i.numpy().astype(np.float64))
    fg = b.numpy()[:, None]
    bg = 1 - fg
    expected = 0.0
    for nn in range(n):
        for dd in range(d):
            for y in range(h):
                for xx in range(w):
                    expected += lam_bg / (2 * bg.sum()) * bg[nn, 0, y, xx] * (sl[nn, dd, y, xx] - il[nn, dd, y, xx]) ** 2
                    expected += lam_fg / (2 * fg.sum()) * fg[nn, 0, y, xx] * (sh[nn, dd, y, xx] - ih[nn, dd, y, xx]) ** 2
    got = fsd_loss(s, i, b, theta, t, lam_bg, lam_fg)
    assert float(got) == pytest.approx(expected, rel=1e-3)
    # the student gets the gradient, the teacher none; equal features give 0
    i.requires_grad_(True)
    fsd_loss(s, i, b, theta, t, lam_bg, lam_fg).backward()
    assert i.grad.abs().sum() > 0
    assert float(fsd_loss(s, s.clone(), b, theta, t, lam_bg, lam_fg)) == pytest.approx(0.0, abs=1e-9)


# ---------------------------------------------------------------------------------------------- SEPA
# A 3x3 image, one channel; the centre (value 0) has seven neighbours of value 0 and one (bottom right) of 4.
IMAGE = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 4.0]])[None, None]
CENTRE = (1, 1)
# neighbour order of dilation 1 (row-major without the centre): (-1,-1) (-1,0) (-1,1) (0,-1) (0,1) (1,-1) (1,0) (1,1)
BOTTOM_RIGHT = 7


def reweighted(features, k, c):
    """S^c = K^c ⊙ S (MISA Eq. 11), written out: (N, D, H, W) features times class c's row of (C, D) ``k``."""
    return features * k[c][None, :, None, None]


def test_colour_affinity_of_the_centre_by_hand():
    assert neighbour_offsets([1])[BOTTOM_RIGHT] == (1, 1)
    a = local_affinity(IMAGE, [1])[0, :, 1, 1]
    # σ over the 8 neighbours: mean 0.5, variance (7·0.25 + 12.25) / 8 = 1.75
    sigma = math.sqrt(1.75)
    expected = [1.0] * 7 + [math.exp(-(4 / sigma) ** 2)]
    assert a.tolist() == pytest.approx(expected, rel=1e-3)  # σ + SIGMA_EPS
    # SIGMA_SCALE s divides the distances by s·σ (PAMR's code: 0.1)
    sharper = local_affinity(IMAGE, [1], sigma_scale=0.5)[0, BOTTOM_RIGHT, 1, 1]
    assert float(sharper) == pytest.approx(math.exp(-(4 / (0.5 * sigma)) ** 2), rel=1e-3)
    # a corner has 3 neighbours inside the image; the 5 outside get no affinity
    corner = local_affinity(IMAGE, [1])[0, :, 0, 0]
    assert int((corner > 0).sum()) == 3


def test_one_propagation_step_of_the_centre_by_hand():
    color = local_affinity(IMAGE, [1])
    features = torch.zeros(1, 2, 3, 3)
    features[0, 1, 2, 2] = 1.0                      # the bottom-right pixel differs in channel 1 only
    k = torch.tensor([[1.0, 0.0], [0.0, 2.0]])      # class 0 ignores channel 1, class 1 doubles it
    feat0 = local_affinity(reweighted(features, k, 0), [1], per_channel_sigma=False)
    assert feat0[0, :, 1, 1].tolist() == pytest.approx([1.0] * 8)   # reweighted for class 0: all alike
    aff = sepa_affinity(color, feat0, balance=0.7)
    m = torch.zeros(1, 1, 3, 3)
    m[0, 0, 2, 2] = 1.0                             # the mask only on the bottom-right pixel
    got = propagate(m, aff, [1], iterations=1)[0, 0, 1, 1]
    a_col = math.exp(-(4 / math.sqrt(1.75)) ** 2)
    # Eq. 13–14: Â = A + 0.7·A^c, normalised; only the bottom-right neighbour carries mask
    expected = (a_col + 0.7 * 1.0) / (7 * (1 + 0.7) + a_col + 0.7 * 1.0)
    assert float(got) == pytest.approx(expected, rel=1e-3)
    # class 1: channel 1 holds seven 0 and one 2 around the centre (variance (7·0.25² + 1.75²) / 8 = 0.4375),
    # channel 0 is flat (variance 0): one σ² = 0.21875 for both; squared distances averaged over 2 channels
    feat1 = local_affinity(reweighted(features, k, 1), [1], per_channel_sigma=False)
    f1 = math.exp(-(4 / 2) / 0.21875)
    assert float(feat1[0, BOTTOM_RIGHT, 1, 1]) == pytest.approx(f1, rel=1e-3)
    got1 = propagate(m, sepa_affinity(color, feat1, 0.7), [1], iterations=1)[0, 0, 1, 1]
    assert float(got1) == pytest.approx((a_col + 0.7 * f1) / (7 * 1.7 + a_col + 0.7 * f1), rel=1e-3)
    assert float(got1) < 0.1 * float(got)


def test_the_class_reweighting_changes_the_feature_affinity():
    """Eq. 11–12 with two non-zero classifier rows: the classes see different affinities (a per-channel σ
    would cancel the reweighting and make them equal)."""
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(1, 3, 6, 6, generator=g)
    k = torch.tensor([[1.0, 1.0, 1.0], [1.0, 4.0, 0.25]])
    a0, a1 = (local_affinity(reweighted(feats, k, c), [1, 2], per_channel_sigma=False)
              for c in (0, 1))
    assert (a0 - a1).abs().max() > 0.05
    # a uniform reweighting (all channels × 3) changes nothing: the affinity is scale-free
    a3 = local_affinity(feats * 3, [1, 2], per_channel_sigma=False)
    assert torch.allclose(a0, a3, atol=1e-4)


def test_channel_weights_give_each_class_the_affinity_of_its_reweighted_features():
    """The contraction over channels (G classes at once) equals Eq. 11–12 on each reweighted copy."""
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(2, 5, 7, 9, generator=g)
    k = torch.randn(3, 5, generator=g)
    weights = torch.stack([k[[0, 2]], k[[1, 1]]])                     # (N=2, G=2, D=5)
    got = local_affinity(feats, [1, 3], per_channel_sigma=False, sigma_scale=0.1, channel_weights=weights)
    assert got.shape == (2, 2, 16, 7, 9)
    for n, classes in ((0, (0, 2)), (1, (1, 1))):
        for j, c in enumerate(classes):
            one = local_affinity(reweighted(feats[n:n + 1], k, c), [1, 3], per_channel_sigma=False, sigma_scale=0.1)
            assert torch.allclose(got[n, j], one[0], atol=1e-5)
    with pytest.raises(ValueError, match="per_channel_sigma"):
        local_affinity(feats, [1], channel_weights=weights)


def test_sepa_pseudo_labels_follow_the_class_of_each_mask():
    """Two masks on one image, classes 0 and 1: each uses its own class's reweighted features."""
    g = torch.Generator().manual_seed(1)
    rgb = torch.rand(1, 3, 8, 8, generator=g) * 255
    feats = torch.randn(1, 4, 8, 8, generator=g)
    k = torch.randn(2, 4, generator=g)
    probs = torch.rand(1, 1, 8, 8, generator=g).expand(2, 1, 8, 8).contiguous()  # the same mask twice
    got = sepa_pseudo_labels(probs, rgb, feats, k, torch.tensor([0, 0]), torch.tensor([0, 1]), 0.7, [1, 2], 3)
    for row, c in ((0, 0), (1, 1)):
        aff = sepa_affinity(local_affinity(rgb, [1, 2]),
                            local_affinity(reweighted(feats, k, c), [1, 2],
                                           per_channel_sigma=False), 0.7)
        assert torch.allclose(got[row:row + 1], propagate(probs[row:row + 1], aff, [1, 2], 3), atol=1e-6)
    assert (got[0] - got[1]).abs().max() > 1e-3  # same mask, different classes: different pseudo labels


def test_sepa_pseudo_labels_of_a_batch_match_each_mask_alone():
    """Masks of two images and three (image, class) groups in mixed order: each pseudo label is that of the
    mask alone with its own image, class and colour."""
    g = torch.Generator().manual_seed(4)
    rgb = torch.rand(2, 3, 8, 8, generator=g) * 255
    feats = torch.randn(2, 4, 8, 8, generator=g)
    k = torch.randn(5, 4, generator=g)
    image, classes = torch.tensor([1, 0, 1, 0, 1]), torch.tensor([4, 2, 0, 2, 4])
    probs = torch.rand(5, 1, 8, 8, generator=g)
    got = sepa_pseudo_labels(probs, rgb, feats, k, image, classes, 0.7, [1, 2], 3, sigma_scale=0.1)
    for p in range(5):
        n = int(image[p])
        alone = sepa_pseudo_labels(probs[p:p + 1], rgb[n:n + 1], feats[n:n + 1], k, torch.tensor([0]),
                                   classes[p:p + 1], 0.7, [1, 2], 3, sigma_scale=0.1)
        assert torch.allclose(got[p:p + 1], alone, atol=1e-6)


def test_sepa_loss_is_the_l1_distance_inside_the_box_and_trains_only_the_prediction():
    probs = torch.full((1, 1, 4, 4), 0.5, requires_grad=True)
    pseudo = torch.zeros(1, 1, 4, 4)
    pseudo[..., :2, :] = 1.0
    box = torch.zeros(1, 1, 4, 4)
    box[..., :, :2] = 1.0
    loss = sepa_loss(probs, pseudo, box)
    assert float(loss.detach()) == pytest.approx(0.5)
    loss.backward()
    assert probs.grad[..., :, 2:].abs().sum() == 0 and probs.grad[..., :, :2].abs().sum() > 0


# ---------------------------------------------------------------------------------------------- BSSS
def _two_box_scene():
    """A 32x32 grey image with a red disc (class 0) and a blue square (class 1), each in its tight box."""
    h = w = 32
    rgb = torch.full((1, 3, h, w), 128.0)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    disc = (yy - 9.5) ** 2 + (xx - 9.5) ** 2 <= 6.5 ** 2
    rgb[0, :, disc] = torch.tensor([220.0, 30.0, 30.0])[:, None]
    square = torch.zeros(h, w, dtype=torch.bool)
    square[18:28, 16:30] = True
    rgb[0, :, square] = torch.tensor([30.0, 30.0, 220.0])[:, None]
    boxes = [mask_boxes(torch.stack([disc, square]))]
    classes = [torch.tensor([0, 1])]
    return rgb, boxes, classes, disc, square


def _losses(logits, rgb, boxes, classes):
    from sim_model.losses.boxinst import prepare_boxinst_targets

    # dilation 1: with free per-pixel logits (no network to smooth them) a dilation of 2 would leave the
    # pixels of odd and even rows/columns unlinked
    prep = prepare_boxinst_targets(rgb, [(32, 32)], boxes, 1, 3, 1, 0, 0.5)
    valid = torch.ones(1, 32, 32, dtype=torch.bool)
    return semantic_box_losses(torch.log_softmax(logits, 1), prep["box_masks"], classes, valid,
                               prep["color_similarity"], 0.3, 3, 1)


def test_bsss_losses_prefer_the_true_segmentation_on_a_two_box_image():
    rgb, boxes, classes, disc, square = _two_box_scene()
    truth = torch.full((32, 32), 2)
    truth[disc], truth[square] = 0, 1
    perfect = torch.nn.functional.one_hot(truth, 3).permute(2, 0, 1)[None].float() * 20
    box_filled = torch.full((32, 32), 2)
    (x0, y0, x1, y1), (u0, v0, u1, v1) = boxes[0].int().tolist()
    box_filled[y0:y1, x0:x1], box_filled[v0:v1, u0:u1] = 0, 1
    filled = torch.nn.functional.one_hot(box_filled, 3).permute(2, 0, 1)[None].float() * 20
    swapped = torch.full((32, 32), 2)
    swapped[disc], swapped[square] = 1, 0
    wrong_class = torch.nn.functional.one_hot(swapped, 3).permute(2, 0, 1)[None].float() * 20
    lp, lf, lw = (_losses(x, rgb, boxes, classes) for x in (perfect, filled, wrong_class))
    # projection: both the true shapes and the filled boxes fill every row and column of their boxes
    assert float(lp["loss_sem_prj"]) < 0.05 and float(lf["loss_sem_prj"]) < 0.05
    # pairwise: the filled boxes cut through same-colour background pairs inside the boxes; the truth does not
    assert float(lp["loss_sem_pairwise"]) < 0.5 * float(lf["loss_sem_pairwise"])
    # unary: a class where no box of it lies is forbidden
    assert float(lp["loss_sem_unary"]) < 1e-3 < float(lw["loss_sem_unary"])


def test_bsss_losses_teach_free_logits_the_shapes_inside_the_boxes():
    """Gradient descent on free per-pixel logits with the three losses recovers the disc and the square
    better than the filled boxes would (IoU with the true shapes)."""
    rgb, boxes, classes, disc, square = _two_box_scene()
    torch.manual_seed(0)
    logits = (torch.randn(1, 3, 32, 32) * 0.01).requires_grad_(True)
    opt = torch.optim.Adam([logits], lr=0.1)
    for _ in range(300):
        opt.zero_grad()
        sum(_losses(logits, rgb, boxes, classes).values()).backward()
        opt.step()
    pred = logits.argmax(1)[0]

    def iou(a, b):
        return float((a & b).sum()) / float((a | b).sum())

    x0, y0, x1, y1 = boxes[0][0].int().tolist()
    box0 = torch.zeros(32, 32, dtype=torch.bool)
    box0[y0:y1, x0:x1] = True
    assert iou(pred == 0, disc) > iou(box0, disc) + 0.05
    assert iou(pred == 1, square) > 0.9
    assert not bool((pred == 1)[disc].any())


def test_bsss_projection_pulls_a_class_as_hard_among_eighty_as_among_two():
    """Inside a class's boxes the projection term works on p_c / (p_c + p_bg): its gradient on the disc's
    class logit there, from uniform logits, is within 10 % the same with 80 classes as with 2 (only the rows
    and columns outside the box differ). On the full softmax it is ~10x weaker here, and once background grows
    outside the boxes it vanishes: coco-mini's teacher predicted background everywhere."""
    rgb, boxes, classes, _, _ = _two_box_scene()
    x0, y0, x1, y1 = boxes[0][0].int().tolist()
    grads = []
    for num_classes in (2, 80):
        logits = torch.zeros(1, num_classes + 1, 32, 32)
        logits[0, 0, y0:y1, x0:x1] = 0.01  # the projections' maxima inside the box (no ties with the outside)
        logits.requires_grad_(True)
        _losses(logits, rgb, boxes, classes)["loss_sem_prj"].backward()
        grads.append(logits.grad[0, 0, y0:y1, x0:x1].abs().sum())
    assert float(grads[0]) > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=0.1, atol=0)


def test_semantic_miou_from_a_confusion_matrix():
    # 2 classes + background; class 1 never occurs nor is predicted: left out of the means
    conf = np.array([[8, 0, 2], [0, 0, 0], [2, 0, 88]])
    r = semantic_miou(conf)
    iou0, iou_bg = 8 / 12, 88 / 92
    assert r["mIoU_fg"] == pytest.approx(100 * iou0)
    assert r["mIoU"] == pytest.approx(100 * (iou0 + iou_bg) / 2)
    assert r["pixel_acc"] == pytest.approx(96.0)
