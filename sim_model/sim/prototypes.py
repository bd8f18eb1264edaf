"""Class prototypes with Sinkhorn-Knopp assignment and the semantic map M_S (SIM Eq. 1–5).

Each class c has L sub-centres ``p^c_1 … p^c_L`` (unit vectors of dimension D, the mask-feature
dimension). The semantic probability map of class c is (SIM Eq. 1)

    M^c_S,i = σ( max_l ⟨z_i, p^c_l⟩ / τ )

for L2-normalised pixel features z_i. The sub-centres follow the features on the fly: the pixels of
class c in one image are assigned to the L sub-centres by an entropic optimal transport with
equal-size clusters (Eq. 2), solved by Sinkhorn-Knopp (Eq. 3); the soft plan is made hard (each pixel
to its largest entry, as in the official code), each sub-centre's per-image centroid is computed
(Eq. 5) and the sub-centre moves towards it by an exponential moving average (Eq. 4), then is
re-normalised to unit length.

Config keys (``sim_model/config.py``): ``MODEL.SIM.PROTOTYPES.NUM_PER_CLASS`` (L, paper 10),
``MODEL.SIM.PROTOTYPES.MOMENTUM`` (γ, paper 0.999), ``MODEL.SIM.PROTOTYPES.TEMPERATURE`` (τ, paper 1.0),
``MODEL.SIM.PROTOTYPES.SINKHORN_EPSILON`` (ε, 0.05) and ``MODEL.SIM.PROTOTYPES.SINKHORN_ITERS`` (3).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def sinkhorn_knopp(scores: torch.Tensor, epsilon: float, n_iters: int) -> torch.Tensor:
    """Entropic optimal-transport assignment of N samples to L equal-size clusters (SIM Eq. 2–3).

    Solves ``max_Q Tr(Q^T S) + ε H(Q)`` over transport plans whose marginals are uniform:
    each sample carries mass 1/N and each cluster receives mass 1/L. Sinkhorn-Knopp alternately
    rescales the clusters (columns) and the samples (rows) of ``exp(S/ε)``; the last step rescales
    the rows, so the row marginals are exact and the column marginals approach 1/L as ``n_iters``
    grows (SwAV's implementation, also used by the official SIM code).

    Args:
        scores: (N, L) float similarities ⟨z_i, p_l⟩ between N samples and L sub-centres.
        epsilon: ε, entropy weight (``MODEL.SIM.PROTOTYPES.SINKHORN_EPSILON``, official code 0.05);
            smaller is harder.
        n_iters: Sinkhorn iterations (``MODEL.SIM.PROTOTYPES.SINKHORN_ITERS``, official code 3).

    Returns:
        (N, L) transport plan Q, same dtype as ``scores``: rows sum to 1/N, columns to ≈ 1/L.
        N = 0 gives an empty (0, L) tensor.

    Raises:
        ValueError: if ``scores`` is not 2-D, ``epsilon`` <= 0 or ``n_iters`` < 1.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be (N, L), got shape {tuple(scores.shape)}")
    if epsilon <= 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    if n_iters < 1:
        raise ValueError(f"n_iters must be >= 1, got {n_iters}")
    n, num_clusters = scores.shape
    if n == 0:
        return scores.new_zeros((0, num_clusters))
    s = scores.double() / epsilon
    q = torch.exp(s - s.max())  # the global shift cancels in the normalisations
    q = q / q.sum()
    for _ in range(n_iters):
        q = q / q.sum(dim=0, keepdim=True).clamp_min(1e-300) / num_clusters  # clusters: 1/L each
        q = q / q.sum(dim=1, keepdim=True).clamp_min(1e-300) / n  # samples: 1/N each
    return q.to(scores.dtype)


class ClassPrototypes(nn.Module):
    """L sub-centre prototypes per class (SIM §3.2.1), kept in registered buffers.

    Buffers (saved in ``state_dict``, so a detectron2 checkpoint restores them):
        ``prototypes``: (C, L, D) float32 unit vectors.
        ``initialized``: (C,) bool, whether class c has received at least one :meth:`update`.
            A class that has never been updated has no semantic map (see :meth:`semantic_map`).

    Initial sub-centres are random unit vectors drawn from a generator seeded with ``seed`` (so two
    runs start identically). The first update of a class replaces its random sub-centres by the
    cluster centroids of that image (an EMA with γ = 0.999 from a random start would need thousands of
    updates to forget it); later updates follow Eq. 4.

    Args:
        num_classes: C.
        num_subcenters: L (``MODEL.SIM.PROTOTYPES.NUM_PER_CLASS``, paper 10).
        dim: D, the mask-feature dimension (the mask branch's output channels).
        momentum: γ of Eq. 4 (``MODEL.SIM.PROTOTYPES.MOMENTUM``, paper 0.999).
        seed: seed of the random initial sub-centres.

    Note:
        Under DistributedDataParallel with ``broadcast_buffers=True`` (the default) rank 0's buffers
        are broadcast at every forward, so only rank 0's updates persist; all ranks stay consistent.
    """

    def __init__(self, num_classes: int, num_subcenters: int, dim: int, momentum: float, seed: int = 0):
        super().__init__()
        if num_classes < 1 or num_subcenters < 1 or dim < 1:
            raise ValueError(f"num_classes, num_subcenters and dim must be >= 1, got "
                             f"{num_classes}, {num_subcenters}, {dim}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        self.num_classes = num_classes
        self.num_subcenters = num_subcenters
        self.dim = dim
        self.momentum = float(momentum)
        g = torch.Generator().manual_seed(seed)
        init = F.normalize(torch.randn(num_classes, num_subcenters, dim, generator=g), dim=-1)
        self.register_buffer("prototypes", init)
        self.register_buffer("initialized", torch.zeros(num_classes, dtype=torch.bool))

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, num_subcenters={self.num_subcenters}, dim={self.dim}, "
                f"momentum={self.momentum}")

    def _check_class(self, class_id: int) -> int:
        class_id = int(class_id)
        if not 0 <= class_id < self.num_classes:
            raise ValueError(f"class id {class_id} outside [0, {self.num_classes})")
        return class_id

    def semantic_map(self, z: torch.Tensor, class_ids: torch.Tensor | Sequence[int], tau: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Semantic probability maps M_S of the given classes (SIM Eq. 1).

        ``M_S,i = σ(max_l ⟨z_i, p^c_l⟩ / τ)``; ``z`` must already be L2-normalised along D, so the inner
        product is the cosine similarity.

        Args:
            z: either (D, H, W) features of one image, scored against each of ``class_ids`` (K,), or
                (K, D, H, W) features, sample k scored against ``class_ids[k]``. Float, unit length along D.
            class_ids: (K,) int class ids in [0, C).
            tau: τ (``MODEL.SIM.PROTOTYPES.TEMPERATURE``, paper 1.0 — Table 8's best row).

        Returns:
            m_s: (K, H, W) probabilities in (0, 1), dtype of ``z``; rows of uninitialised classes are 0.
            valid: (K,) bool, False for a class that has no prototypes yet (no M_S: the caller uses M_I
                alone, see :func:`sim_model.sim.pseudo_masks.rectify`).

        Raises:
            ValueError: bad shapes, D mismatch, class id out of range, or tau <= 0.
        """
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        class_ids = torch.as_tensor(class_ids, dtype=torch.long, device=self.prototypes.device).reshape(-1)
        if class_ids.numel() and (class_ids.min() < 0 or class_ids.max() >= self.num_classes):
            raise ValueError(f"class ids {class_ids.tolist()} outside [0, {self.num_classes})")
        protos = self.prototypes[class_ids].to(z.dtype)  # (K, L, D)
        if z.dim() == 3:
            if z.shape[0] != self.dim:
                raise ValueError(f"z has D={z.shape[0]}, prototypes have D={self.dim}")
            sim = torch.einsum("kld,dhw->klhw", protos, z)
        elif z.dim() == 4:
            if z.shape[1] != self.dim or z.shape[0] != class_ids.numel():
                raise ValueError(f"z (K, D, H, W) = {tuple(z.shape)} does not match {class_ids.numel()} classes "
                                 f"and D={self.dim}")
            sim = torch.einsum("kld,kdhw->klhw", protos, z)
        else:
            raise ValueError(f"z must be (D, H, W) or (K, D, H, W), got shape {tuple(z.shape)}")
        valid = self.initialized[class_ids]
        m_s = torch.sigmoid(sim.max(dim=1).values / tau)
        m_s = m_s * valid.to(m_s.dtype)[:, None, None]
        return m_s, valid

    @torch.no_grad()
    def update(self, z_pixels: torch.Tensor, class_id: int, epsilon: float, n_iters: int,
               hard_assignment: bool = True) -> torch.Tensor:
        """Move class ``class_id``'s sub-centres towards one image's pixel clusters (SIM Eq. 2–5).

        The pixels are assigned to the L sub-centres by :func:`sinkhorn_knopp` on their cosine
        similarities, the plan is made hard (argmax per pixel; official code), the per-sub-centre
        centroid ``p^c_n,l`` is the mean of its pixels (Eq. 5), and ``p^c_l ← γ p^c_l + (1 − γ) p^c_n,l``
        (Eq. 4), re-normalised to unit length. Sub-centres that receive no pixel are unchanged. The
        first update of a class copies the centroids (γ = 0 once), see the class docstring. (ProtoSeg's
        implementation L2-normalises the centroid before the EMA; here Eq. 5's plain mean is used —
        with the re-normalisation after the EMA the two differ only in the effective step size.)

        Args:
            z_pixels: (P, D) float L2-normalised features of the class's pixels in one image (the
                official code feeds the teacher's features of in-box pixels whose mask probability
                exceeds 0.7). P = 0 does nothing.
            class_id: the class c.
            epsilon: ε of Sinkhorn (``MODEL.SIM.PROTOTYPES.SINKHORN_EPSILON``, 0.05).
            n_iters: Sinkhorn iterations (``MODEL.SIM.PROTOTYPES.SINKHORN_ITERS``, 3).
            hard_assignment: ``MODEL.SIM.PROTOTYPES.HARD_ASSIGNMENT`` (True, official code and Eq. 5's
                indicator). False uses the soft plan (rows rescaled to sum to 1) as centroid weights.

        Returns:
            (P,) long argmax assignment of each pixel to a sub-centre (empty when P = 0).

        Raises:
            ValueError: class id out of range or ``z_pixels`` not (P, D).
        """
        class_id = self._check_class(class_id)
        if z_pixels.dim() != 2 or z_pixels.shape[1] != self.dim:
            raise ValueError(f"z_pixels must be (P, {self.dim}), got shape {tuple(z_pixels.shape)}")
        z = z_pixels.detach().to(self.prototypes.device, torch.float32)
        if z.shape[0] == 0:
            return torch.zeros(0, dtype=torch.long, device=z.device)
        protos = self.prototypes[class_id]  # (L, D)
        q = sinkhorn_knopp(z @ protos.t(), epsilon, n_iters)
        assign = q.argmax(dim=1)
        if hard_assignment:
            weights = F.one_hot(assign, self.num_subcenters).to(z.dtype)  # (P, L)
        else:
            weights = q * q.shape[0]  # each pixel's row sums to 1
        counts = weights.sum(dim=0)  # (L,)
        sums = weights.t() @ z  # (L, D)
        filled = counts > 1e-6
        centroids = sums[filled] / counts[filled, None]
        gamma = self.momentum if bool(self.initialized[class_id]) else 0.0
        new = protos.clone()
        new[filled] = F.normalize(gamma * protos[filled] + (1.0 - gamma) * centroids, dim=-1)
        self.prototypes[class_id] = new
        self.initialized[class_id] = True
        return assign
