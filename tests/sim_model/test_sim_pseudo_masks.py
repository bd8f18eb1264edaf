"""SIM Eq. 6–8 and 11: positive weights, M_I, rectification, thresholds, pseudo-mask loss, S_k, and the chain."""
import math

import pytest
import torch
import torch.nn.functional as F

from sim_model.losses.dice import DICE_EPS
from sim_model.sim.prototypes import ClassPrototypes
from sim_model.sim.pseudo_masks import (instance_map, mask_score, positive_weights, pseudo_mask_loss, rectify,
                                        sim_pseudo_masks, threshold_pseudo_mask)

GT = torch.tensor([0.0, 0.0, 10.0, 10.0])
# IoU with GT: 1, 0.5, 0
PRED = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 5.0], [20.0, 20.0, 30.0, 30.0]])


def test_positive_weights_eq6_hand_value():
    w = positive_weights(PRED, GT, mu=5.0)
    e = torch.tensor([math.exp(5.0), math.exp(2.5), 1.0])
    torch.testing.assert_close(w, e / e.sum())
    assert abs(float(w.sum()) - 1.0) < 1e-6
    assert w[0] > w[1] > w[2]  # high-IoU positives dominate
    torch.testing.assert_close(positive_weights(PRED, GT, mu=0.0), torch.full((3,), 1 / 3))
    # a larger µ widens the gaps
    assert positive_weights(PRED, GT, mu=20.0)[0] > w[0]
    assert positive_weights(PRED[:0], GT, mu=5.0).shape == (0,)
    with pytest.raises(ValueError):
        positive_weights(PRED[:, :3], GT, mu=5.0)


def test_instance_map_is_weighted_sum():
    masks = torch.stack([torch.ones(2, 3), torch.zeros(2, 3), torch.full((2, 3), 0.5)])
    masks[1, 0, 0] = 1.0
    w = torch.tensor([0.5, 0.3, 0.2])
    m_i = instance_map(masks, w)
    expected = torch.full((2, 3), 0.5 + 0.1)
    expected[0, 0] = 0.5 + 0.3 + 0.1
    torch.testing.assert_close(m_i, expected)
    assert instance_map(torch.zeros(0, 4, 5), torch.zeros(0)).shape == (4, 5)
    assert (instance_map(torch.zeros(0, 4, 5), torch.zeros(0)) == 0).all()
    with pytest.raises(ValueError):
        instance_map(masks, w[:2])


def test_rectify_eq7_and_fallback():
    m_s = torch.tensor([[[0.2, 0.8]], [[0.6, 0.6]]])
    m_i = torch.tensor([[[0.6, 1.0]], [[0.0, 1.0]]])
    torch.testing.assert_close(rectify(m_s, m_i, 0.5), torch.tensor([[[0.4, 0.9]], [[0.3, 0.8]]]))
    torch.testing.assert_close(rectify(m_s, m_i, 0.25), 0.75 * m_s + 0.25 * m_i)
    torch.testing.assert_close(rectify(m_s, m_i, 1.0), m_i)
    # class 1 has no prototypes: M_I alone
    out = rectify(m_s, m_i, 0.5, semantic_valid=torch.tensor([True, False]))
    torch.testing.assert_close(out[0], torch.tensor([[0.4, 0.9]]))
    torch.testing.assert_close(out[1], m_i[1])
    with pytest.raises(ValueError):
        rectify(m_s, m_i, 1.5)
    with pytest.raises(ValueError):
        rectify(m_s, m_i[:1], 0.5)


def test_thresholds_eq8():
    p = torch.tensor([0.0, 0.2, 0.3, 0.31, 0.5, 0.69, 0.7, 0.95])
    target, weight = threshold_pseudo_mask(p, tau_low=0.3, tau_high=0.7)
    assert target.tolist() == [0, 0, 0, 0, 0, 0, 1, 1]
    assert weight.tolist() == [1, 1, 1, 0, 0, 0, 1, 1]
    assert target.dtype == p.dtype and weight.dtype == p.dtype
    # τ_low = τ_high = 0.5: every pixel supervises (Table 7's first row)
    t, w = threshold_pseudo_mask(p, 0.5, 0.5)
    assert w.tolist() == [1] * 8 and t.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    with pytest.raises(ValueError):
        threshold_pseudo_mask(p, 0.8, 0.2)


def _loss_case():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, generator=g)
    target = (torch.rand(2, 4, 5, generator=g) > 0.5).float()
    weight = (torch.rand(2, 4, 5, generator=g) > 0.3).float()
    return logits, target, weight


def test_pseudo_loss_matches_functional_on_kept_pixels():
    logits, target, weight = _loss_case()
    loss = pseudo_mask_loss(logits, target, weight)
    expected = []
    for k in range(2):
        keep = weight[k] > 0
        x, t = logits[k][keep], target[k][keep]
        bce = F.binary_cross_entropy_with_logits(x, t)  # once, from the logits
        p = torch.sigmoid(x)
        dice = 1 - 2 * (p * t).sum() / ((p * p).sum() + (t * t).sum() + DICE_EPS)
        expected.append(bce + dice)
    torch.testing.assert_close(loss, torch.stack(expected).mean())
    # weights of the two terms
    bce_only = pseudo_mask_loss(logits, target, weight, bce_weight=1.0, dice_weight=0.0)
    keep = weight[0] > 0
    torch.testing.assert_close(
        bce_only,
        (F.binary_cross_entropy_with_logits(logits[0][keep], target[0][keep])
         + F.binary_cross_entropy_with_logits(logits[1][weight[1] > 0], target[1][weight[1] > 0])) / 2)


def test_pseudo_loss_ignored_pixels_change_nothing():
    logits, target, weight = _loss_case()
    logits.requires_grad_(True)
    loss = pseudo_mask_loss(logits, target, weight)
    loss.backward()
    assert (logits.grad[weight == 0] == 0).all()
    assert (logits.grad[weight == 1] != 0).any()
    changed = logits.detach().clone()
    changed[weight == 0] = 50.0
    t2 = target.clone()
    t2[weight == 0] = 1 - t2[weight == 0]
    torch.testing.assert_close(pseudo_mask_loss(changed, t2, weight), loss.detach())


def test_pseudo_loss_perfect_prediction_is_small_and_wrong_is_large():
    target = torch.zeros(1, 6, 6)
    target[0, 1:4, 1:4] = 1
    w = torch.ones_like(target)
    good = pseudo_mask_loss((target * 2 - 1) * 20, target, w)
    bad = pseudo_mask_loss((1 - target * 2) * 20, target, w)
    assert float(good) < 1e-3 and float(bad) > 10


def test_pseudo_loss_empty_and_fully_ignored():
    x = torch.zeros(0, 4, 4, requires_grad=True)
    loss = pseudo_mask_loss(x, torch.zeros(0, 4, 4), torch.zeros(0, 4, 4))
    assert float(loss.detach()) == 0.0 and loss.requires_grad
    loss.backward()
    logits, target, weight = _loss_case()
    weight[1] = 0  # instance 1 fully ignored: the mean is over instance 0 alone
    torch.testing.assert_close(pseudo_mask_loss(logits, target, weight),
                               pseudo_mask_loss(logits[:1], target[:1], weight[:1]))
    y = torch.randn(2, 3, 3, requires_grad=True)
    z = pseudo_mask_loss(y, torch.ones(2, 3, 3), torch.zeros(2, 3, 3))
    assert float(z.detach()) == 0.0 and z.requires_grad
    with pytest.raises(ValueError):
        pseudo_mask_loss(y, torch.ones(2, 3, 4), torch.ones(2, 3, 3))


def test_mask_score_eq11():
    m_prob = torch.tensor([[[0.9, 0.8], [0.2, 0.5]], [[0.1, 0.2], [0.3, 0.4]]])
    target, _ = threshold_pseudo_mask(m_prob, 0.3, 0.7)
    s = mask_score(m_prob, target)
    torch.testing.assert_close(s, torch.tensor([0.85, 0.0]))  # instance 1: no foreground pixel
    torch.testing.assert_close(mask_score(m_prob[0], target[0]), torch.tensor(0.85))
    torch.testing.assert_close(mask_score(m_prob, target.bool()), s)
    with pytest.raises(ValueError):
        mask_score(m_prob, target[:1])


def _chain_inputs():
    g = torch.Generator().manual_seed(4)
    probs = torch.rand(5, 6, 7, generator=g)
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 0.0, 10.0, 9.0], [0.0, 0.0, 6.0, 10.0],
                          [20.0, 20.0, 30.0, 30.0], [21.0, 19.0, 30.0, 31.0]])
    obj = torch.tensor([0, 0, 0, 1, -1])  # the last positive belongs to none of these objects
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0], [40.0, 40.0, 50.0, 50.0]])
    z = F.normalize(torch.randn(3, 4, 6, 7, generator=g), dim=1)
    protos = ClassPrototypes(num_classes=3, num_subcenters=2, dim=4, momentum=0.9, seed=1)
    protos.update(z[0].flatten(1).t()[:20], 1, epsilon=0.05, n_iters=3)  # class 1 gets prototypes
    return probs, boxes, obj, gt, z, protos


def test_chain_composes_eq6_eq1_eq7_eq8_eq11():
    probs, boxes, obj, gt, z, protos = _chain_inputs()
    classes = torch.tensor([1, 0, -1])  # with prototypes, never updated, unknown label
    region = torch.ones(3, 6, 7)
    region[:, :, 5:] = 0
    pm = sim_pseudo_masks(probs, boxes, obj, gt, z, classes, protos, mu=5.0, alpha=0.3, tau=0.5, tau_low=0.3,
                          tau_high=0.7, region=region)
    m_i0 = instance_map(probs[:3], positive_weights(boxes[:3], gt[0], 5.0))
    m_i1 = instance_map(probs[3:4], positive_weights(boxes[3:4], gt[1], 5.0))
    torch.testing.assert_close(pm.instance_map, torch.stack([m_i0, m_i1, torch.zeros(6, 7)]))
    m_s0, valid = protos.semantic_map(z[:1], [1], 0.5)
    assert valid.tolist() == [True]
    expected = torch.stack([0.7 * m_s0[0] + 0.3 * m_i0, m_i1, torch.zeros(6, 7)]) * region
    torch.testing.assert_close(pm.prob, expected)
    t, w = threshold_pseudo_mask(expected, 0.3, 0.7)
    torch.testing.assert_close(pm.target, t)
    torch.testing.assert_close(pm.weight, w)
    torch.testing.assert_close(pm.score, mask_score(expected, t))
    assert not pm.target[:, :, 5:].any()  # nothing outside the region


def test_chain_shared_features_resample_and_no_prototypes():
    probs, boxes, obj, gt, z, protos = _chain_inputs()
    classes = torch.tensor([1, 1, 1])
    per_object = sim_pseudo_masks(probs, boxes, obj, gt, z[0].expand(3, -1, -1, -1), classes, protos, mu=5.0,
                                  alpha=0.5, tau=1.0, tau_low=0.3, tau_high=0.7)
    shared = sim_pseudo_masks(probs, boxes, obj, gt, z[0], classes, protos, mu=5.0, alpha=0.5, tau=1.0,
                              tau_low=0.3, tau_high=0.7, resample=lambda m: m[:, 1:4, 2:6])
    torch.testing.assert_close(shared.prob, per_object.prob[:, 1:4, 2:6])
    assert shared.target.shape == (3, 3, 4)
    alone = sim_pseudo_masks(probs, boxes, obj, gt, z[0], classes, None, mu=5.0, alpha=0.5, tau=1.0,
                             tau_low=0.3, tau_high=0.7)
    torch.testing.assert_close(alone.prob, alone.instance_map)  # no prototypes: M_I alone
    assert not torch.allclose(alone.prob[0], per_object.prob[0])
    with pytest.raises(ValueError, match="class ids"):
        sim_pseudo_masks(probs, boxes, obj, gt, z[0], classes[:2], protos, mu=5.0, alpha=0.5, tau=1.0,
                         tau_low=0.3, tau_high=0.7)
