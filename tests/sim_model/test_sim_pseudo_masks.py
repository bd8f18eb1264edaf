"""SIM Eq. 6–8 and 11: positive weights, M_I, rectification, thresholds, pseudo-mask loss, S_k."""
import math

import pytest
import torch
import torch.nn.functional as F

from sim_model.sim.pseudo_masks import (DICE_EPS, instance_map, mask_score, positive_weights, pseudo_mask_loss,
                                        rectify, threshold_pseudo_mask)

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
