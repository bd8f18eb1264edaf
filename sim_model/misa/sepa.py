"""Semantic Enhanced Pairwise Affinity (MISA, IJCAI 2024, §3.3, Eq. 7–15).

Pseudo labels M̂ come from propagating the predicted mask probabilities M over a pairwise affinity of each
pixel with its local neighbours (PAMR, Araslanov & Roth 2020: the 8 neighbours at each of several
dilations, iterated). MISA's affinity is the colour affinity A (Eq. 8) plus the class-reweighted affinity
of the BSSS teacher's dense features, A^c with S^c = K^c ⊙ S (Eq. 11–12), summed with a balance weight
(Eq. 13); the network is trained towards M̂ with an L1 loss (Eq. 15), in place of BoxInst's pairwise term.

σ of Eq. 8 is, as in PAMR, the standard deviation of each colour channel over the pixel's neighbourhood; σ of
Eq. 12 is one standard deviation over the neighbourhood and all feature channels (a per-channel σ would
cancel Eq. 11's reweighting). ``|Δ|/σ`` is averaged over the channels after squaring. Neighbours outside the
image get no weight. The global (APro-style) propagation is not implemented.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

#: Added to σ so that a flat neighbourhood (σ = 0) gives affinity 1 to equal values, 0 to others.
SIGMA_EPS = 1e-5


def local_affinity(x: torch.Tensor, dilations: Sequence[int], per_channel_sigma: bool = True,
                   sigma_scale: float = 1.0) -> torch.Tensor:
    """Pairwise affinity of each pixel i with its local neighbours k, ``exp(−mean_c (x_ic − x_kc)² / (s·σ)²)``.

    For RGB (MISA Eq. 8) σ is per channel, the standard deviation of that channel over pixel i's valid
    neighbours (PAMR). For features (Eq. 10/12, ``per_channel_sigma=False``) σ is one number per pixel, the
    standard deviation over its neighbours and all channels (σ_{S^c} of Eq. 12): a per-channel σ would cancel
    the class reweighting S^c = K^c ⊙ S of Eq. 11, which scales each channel's spread with its values.

    Args:
        x: (N, C, H, W) float (RGB in [0, 255], or dense features).
        dilations: the 8 neighbours at each of these dilations (:func:`neighbour_offsets`).
        per_channel_sigma: True for colour (Eq. 8), False for features (Eq. 12).
        sigma_scale: s (``MODEL.MISA.SEPA.SIGMA_SCALE``): 1 in MISA's equations, 0.1 in PAMR's code.

    Returns:
        (N, K, H, W) float in [0, 1], K = 8·len(dilations); 0 for neighbours outside the image.
    """
    offsets = neighbour_offsets(dilations)
    r = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    h, w = x.shape[-2:]
    xp = F.pad(x, (r, r, r, r))
    vp = F.pad(torch.ones((1, 1, h, w), device=x.device, dtype=x.dtype), (r, r, r, r))

    def shifted(t: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
        return t[:, :, r + dy: r + dy + h, r + dx: r + dx + w]

    # σ over each pixel's valid neighbours (two passes over the offsets: no (N, C, K, H, W) tensor)
    count = torch.zeros((1, 1, h, w), device=x.device, dtype=x.dtype)
    total = torch.zeros_like(x)
    for dy, dx in offsets:
        count = count + shifted(vp, dy, dx)
        total = total + shifted(xp, dy, dx)
    mean = total / count.clamp(min=1.0)
    var = torch.zeros_like(x)
    for dy, dx in offsets:
        var = var + (shifted(xp, dy, dx) - mean) ** 2 * shifted(vp, dy, dx)
    var = var / count.clamp(min=1.0)
    if not per_channel_sigma:
        var = var.mean(dim=1, keepdim=True)
    inv_sigma = 1.0 / (sigma_scale * var.sqrt() + SIGMA_EPS)
    out = []
    for dy, dx in offsets:
        d2 = ((x - shifted(xp, dy, dx)) * inv_sigma) ** 2
        out.append(torch.exp(-d2.mean(dim=1)) * shifted(vp, dy, dx)[:, 0])
    return torch.stack(out, dim=1)


def class_features(features: torch.Tensor, classifier: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """The teacher's dense features reweighted per channel by the classifier row of a class, S^c = K^c ⊙ S
    (MISA Eq. 11, CAM-style saliency factors).

    Args:
        features: S, (N, D, H, W) float.
        classifier: K, (C, D) float, the 1×1 classifier of the BSSS network over the C object classes.
        classes: (N,) long class c of each row of ``features``.

    Returns:
        (N, D, H, W) float.
    """
    return features * classifier[classes][:, :, None, None]


def sepa_affinity(color_affinity: torch.Tensor, feature_affinity: torch.Tensor, balance: float) -> torch.Tensor:
    """Semantic Enhanced Pairwise Affinity ``Â^c = A + β · A^c`` (MISA Eq. 13, β ``MODEL.MISA.SEPA.BALANCE``
    0.7), normalised over the neighbours (ŵ of Eq. 14, as Eq. 9). Eq. 13 prints a plain sum and §4.3 an
    "affinity balanced coefficient" of 0.7 without saying which term it weights: our reading is β on A^c.

    Args:
        color_affinity: A, (P, K, H, W) float (:func:`local_affinity` of the RGB image).
        feature_affinity: A^c, (P, K, H, W) float (:func:`local_affinity` of S^c).
        balance: β.

    Returns:
        (P, K, H, W) float, summing to 1 over K where any neighbour has affinity (0 elsewhere).
    """
    a = color_affinity + balance * feature_affinity
    return a / a.sum(dim=1, keepdim=True).clamp(min=1e-12)


def neighbour_offsets(dilations: Sequence[int]) -> list[tuple[int, int]]:
    """(dy, dx) of the K = 8·len(dilations) neighbours (centre excluded), row-major per dilation: the order
    of the K axis of :func:`local_affinity` and :func:`propagate`."""
    return [(dy * d, dx * d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def propagate(probs: torch.Tensor, affinity: torch.Tensor, dilations: Sequence[int], iterations: int) -> torch.Tensor:
    """Pseudo labels by propagating mask probabilities over a normalised affinity (MISA Eq. 7/14), repeated
    ``iterations`` times (PAMR): ``M ← Σ_k ŵ Â_k · M(k)``.

    Args:
        probs: M, (P, 1, H, W) float mask probabilities.
        affinity: (P, K, H, W) or (1, K, H, W) (shared by all P masks) float, normalised over K
            (:func:`sepa_affinity`), neighbours in the order of :func:`neighbour_offsets` of the same ``dilations``.
        iterations: propagation steps (``MODEL.MISA.SEPA.ITERATIONS``, PAMR 10).

    Returns:
        M̂, (P, 1, H, W) float. Neighbours outside the image contribute 0 (their affinity is 0).
    """
    offsets = neighbour_offsets(dilations)
    r = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    h, w = probs.shape[-2:]
    m = probs
    for _ in range(iterations):
        mp = F.pad(m, (r, r, r, r))
        acc = torch.zeros_like(m)
        for k, (dy, dx) in enumerate(offsets):
            acc = acc + affinity[:, k:k + 1] * mp[:, :, r + dy: r + dy + h, r + dx: r + dx + w]
        m = acc
    return m


def sepa_loss(probs: torch.Tensor, pseudo: torch.Tensor, box_mask: torch.Tensor) -> torch.Tensor:
    """The L1 loss between predicted masks and propagated pseudo labels (MISA Eq. 15), averaged over each
    mask's box cells and then over the masks (the paper's sum, normalised so that its weight does not
    depend on object size or count). The pseudo labels are not differentiated.

    Args:
        probs: M, (P, 1, H, W) float probabilities; pseudo: M̂, same shape; box_mask: (P, 1, H, W) {0, 1}.

    Returns:
        Scalar float; ``probs.sum() * 0`` when P = 0.
    """
    if probs.shape[0] == 0:
        return probs.sum() * 0
    per_mask = ((probs - pseudo.detach()).abs() * box_mask).flatten(1).sum(1) / box_mask.flatten(1).sum(1).clamp(min=1)
    return per_mask.mean()


def sepa_pseudo_labels(probs: torch.Tensor, rgb: torch.Tensor, features: torch.Tensor, classifier: torch.Tensor,
                       image_index: torch.Tensor, classes: torch.Tensor, balance: float, dilations: Sequence[int],
                       iterations: int, sigma_scale: float = 1.0) -> torch.Tensor:
    """MISA's pseudo labels of P predicted masks (Eq. 8, 11–14): the colour affinity of each mask's image plus
    the affinity of its image's teacher features reweighted for the mask's class, propagated over the mask.

    Args:
        probs: M, (P, 1, H, W) float mask probabilities on the mask grid (not differentiated here).
        rgb: (N, 3, H, W) float RGB [0, 255] of the batch on the same grid.
        features: S, (N, D, H, W) float teacher features on the same grid.
        classifier: K, (C, D) float (:attr:`sim_model.misa.bsss.BoxSemSeg.class_weights`).
        image_index, classes: (P,) long image and ground-truth class of each mask.
        balance, dilations, iterations, sigma_scale: ``MODEL.MISA.SEPA.{BALANCE, DILATIONS, ITERATIONS,
            SIGMA_SCALE}``.

    Returns:
        M̂, (P, 1, H, W) float.
    """
    if probs.shape[0] == 0:
        return probs.detach()
    num_classes = classifier.shape[0]
    key = image_index * num_classes + classes
    pairs, inverse = key.unique(return_inverse=True)
    pair_images = pairs // num_classes
    color = local_affinity(rgb[pair_images], dilations, sigma_scale=sigma_scale)
    feature = local_affinity(class_features(features[pair_images], classifier, pairs % num_classes), dilations,
                             per_channel_sigma=False, sigma_scale=sigma_scale)
    affinity = sepa_affinity(color, feature, balance)                 # (G, K, H, W), one per (image, class)
    pseudo = torch.empty_like(probs)
    for g in range(pairs.shape[0]):
        rows = (inverse == g).nonzero()[:, 0]
        pseudo[rows] = propagate(probs[rows].detach(), affinity[g:g + 1], dilations, iterations)
    return pseudo


__all__ = ["local_affinity", "class_features", "sepa_affinity", "propagate", "neighbour_offsets", "sepa_loss",
           "sepa_pseudo_labels"]
