"""SIM Eq. 1–5: Sinkhorn-Knopp assignment, prototype EMA update and the semantic map M_S."""
import math

import pytest
import torch
import torch.nn.functional as F

from sim_model.sim.prototypes import ClassPrototypes, sinkhorn_knopp


def _objective(q, s, eps):
    """Tr(Q^T S) + ε H(Q) of Eq. 2 (Q as (N, L))."""
    return float((q * s).sum() - eps * (q * torch.log(q)).sum())


def test_sinkhorn_one_iteration_hand_value():
    # K = exp(S / 1) = [[3, 1], [1, 1]]; K / 6 -> columns scaled to 1/2 each -> rows to 1/2 each.
    s = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]], dtype=torch.float64)
    q = sinkhorn_knopp(s, epsilon=1.0, n_iters=1)
    expected = torch.tensor([[0.3, 0.2], [1 / 6, 1 / 3]], dtype=torch.float64)
    torch.testing.assert_close(q, expected)


def test_sinkhorn_marginals():
    g = torch.Generator().manual_seed(0)
    n, num_l = 50, 5
    s = F.normalize(torch.randn(n, 8, generator=g), dim=1) @ F.normalize(torch.randn(num_l, 8, generator=g), dim=1).t()
    q3 = sinkhorn_knopp(s, epsilon=0.05, n_iters=3)
    assert q3.shape == (n, num_l)
    assert (q3 >= 0).all()
    torch.testing.assert_close(q3.sum(1), torch.full((n,), 1 / n))  # rows: exactly 1/N
    q50 = sinkhorn_knopp(s.double(), epsilon=0.05, n_iters=200)
    torch.testing.assert_close(q50.sum(0), torch.full((num_l,), 1 / num_l, dtype=torch.float64), atol=1e-6, rtol=0)
    # 3 iterations already pull the clusters closer to equal size than a plain softmax does
    soft = torch.softmax(s / 0.05, dim=1) / n
    assert (q3.sum(0) - 1 / num_l).abs().sum() < (soft.sum(0) - 1 / num_l).abs().sum()


def test_sinkhorn_converged_plan_is_the_entropic_optimum():
    # Brute force: any feasible perturbation (zero row and column sums) lowers the objective of Eq. 2.
    g = torch.Generator().manual_seed(1)
    s = torch.rand(6, 3, generator=g, dtype=torch.float64)
    eps = 0.5
    q = sinkhorn_knopp(s, epsilon=eps, n_iters=500)
    best = _objective(q, s, eps)
    for i, k in [(0, 1), (2, 5), (3, 4)]:
        for j, m in [(0, 1), (1, 2), (0, 2)]:
            for d in (1e-3, -1e-3):
                p = q.clone()
                p[i, j] += d
                p[k, m] += d
                p[i, m] -= d
                p[k, j] -= d
                assert _objective(p, s, eps) < best
    # and the form of Eq. 3: log Q - S/ε = log u_i + log v_j
    r = torch.log(q) - s / eps
    torch.testing.assert_close(r - r[:, :1] - r[:1, :] + r[0, 0], torch.zeros_like(r), atol=1e-8, rtol=0)


def test_sinkhorn_bad_input():
    with pytest.raises(ValueError):
        sinkhorn_knopp(torch.zeros(3), 0.05, 3)
    with pytest.raises(ValueError):
        sinkhorn_knopp(torch.zeros(3, 2), 0.0, 3)
    assert sinkhorn_knopp(torch.zeros(0, 4), 0.05, 3).shape == (0, 4)


def _protos_xy(momentum=0.9):
    p = ClassPrototypes(num_classes=2, num_subcenters=2, dim=2, momentum=momentum)
    p.prototypes[0] = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p.initialized[0] = True
    return p


def test_prototype_ema_update_hand_value():
    p = _protos_xy(momentum=0.9)
    other = p.prototypes[1].clone()
    z = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [0.6, 0.8]])
    assign = p.update(z, 0, epsilon=0.05, n_iters=3)
    assert assign.tolist() == [0, 0, 1, 1]
    # centroids (0.9, 0.3) and (0.3, 0.9); 0.9 * p + 0.1 * centroid, re-normalised
    e0 = torch.tensor([0.99, 0.03]) / math.sqrt(0.99 ** 2 + 0.03 ** 2)
    e1 = torch.tensor([0.03, 0.99]) / math.sqrt(0.99 ** 2 + 0.03 ** 2)
    torch.testing.assert_close(p.prototypes[0], torch.stack([e0, e1]))
    torch.testing.assert_close(p.prototypes[1], other)  # other class untouched
    assert not bool(p.initialized[1])


def test_prototype_update_balances_clusters():
    # All four pixels are closer to sub-centre 0; the equal-size constraint sends two of them to sub-centre 1.
    p = _protos_xy()
    z = F.normalize(torch.tensor([[1.0, 0.0], [0.99, 0.14], [0.98, 0.2], [0.95, 0.31]]), dim=1)
    assign = p.update(z, 0, epsilon=0.05, n_iters=3)
    assert torch.bincount(assign, minlength=2).tolist() == [2, 2]
    assert assign.tolist() == [0, 0, 1, 1]  # the two most "y-ward" pixels move


def test_first_update_copies_centroids_and_marks_initialized():
    p = ClassPrototypes(num_classes=3, num_subcenters=2, dim=3, momentum=0.999)
    assert not p.initialized.any()
    g = torch.Generator().manual_seed(3)
    z = F.normalize(torch.randn(40, 3, generator=g), dim=1)
    assign = p.update(z, 2, epsilon=0.05, n_iters=3)
    assert bool(p.initialized[2]) and not bool(p.initialized[0])
    for l in range(2):
        sel = z[assign == l]
        assert len(sel) > 0
        torch.testing.assert_close(p.prototypes[2, l], F.normalize(sel.mean(0), dim=0))


def test_update_soft_assignment_and_empty_input():
    p = _protos_xy(momentum=0.0)
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    before = p.prototypes.clone()
    assert p.update(z[:0], 0, 0.05, 3).numel() == 0
    torch.testing.assert_close(p.prototypes, before)
    p.update(z, 0, epsilon=0.05, n_iters=3, hard_assignment=False)
    # soft plan of two clearly separated pixels ~ one-hot: prototypes stay where they are
    torch.testing.assert_close(p.prototypes[0], before[0], atol=1e-6, rtol=0)
    with pytest.raises(ValueError):
        p.update(z, 5, 0.05, 3)
    with pytest.raises(ValueError):
        p.update(torch.zeros(3, 4), 0, 0.05, 3)


def test_semantic_map_eq1():
    p = _protos_xy()
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [-0.6, -0.8]]).t().reshape(2, 1, 4)  # (D, H, W)
    for tau in (1.0, 0.5):
        m_s, valid = p.semantic_map(z, [0, 1], tau=tau)
        assert m_s.shape == (2, 1, 4)
        assert valid.tolist() == [True, False]
        expected = torch.sigmoid(torch.tensor([1.0, 1.0, 0.0, -0.6]) / tau)
        torch.testing.assert_close(m_s[0, 0], expected)
        assert (m_s[1] == 0).all()  # class 1 has no prototypes yet


def test_semantic_map_batched_matches_single():
    p = _protos_xy()
    p.prototypes[1] = F.normalize(torch.tensor([[1.0, 1.0], [1.0, -1.0]]), dim=1)
    p.initialized[1] = True
    g = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(2, 2, 3, 5, generator=g), dim=1)  # (K, D, H, W)
    m_s, valid = p.semantic_map(z, torch.tensor([1, 0]), tau=1.0)
    assert valid.all()
    torch.testing.assert_close(m_s[0], p.semantic_map(z[0], [1], tau=1.0)[0][0])
    torch.testing.assert_close(m_s[1], p.semantic_map(z[1], [0], tau=1.0)[0][0])
    # brute force on one pixel
    zi = z[0, :, 2, 4]
    brute = 1 / (1 + math.exp(-max(float(zi @ p.prototypes[1, 0]), float(zi @ p.prototypes[1, 1]))))
    assert abs(float(m_s[0, 2, 4]) - float(brute)) < 1e-6
    with pytest.raises(ValueError):
        p.semantic_map(z, [0, 7], tau=1.0)
    with pytest.raises(ValueError):
        p.semantic_map(z[0], [0], tau=0.0)


def test_prototypes_state_dict_roundtrip():
    p = _protos_xy()
    p.update(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), 0, 0.05, 3)
    q = ClassPrototypes(num_classes=2, num_subcenters=2, dim=2, momentum=0.9, seed=123)
    assert not torch.equal(q.prototypes, p.prototypes)
    q.load_state_dict(p.state_dict())
    assert torch.equal(q.prototypes, p.prototypes) and torch.equal(q.initialized, p.initialized)
    assert set(p.state_dict()) == {"prototypes", "initialized"}
