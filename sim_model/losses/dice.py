"""The Dice loss shared by BoxInst's projection loss and SIM's pseudo-mask and paste losses."""
from __future__ import annotations

import torch

#: Smoothing term of the Dice coefficient (AdelaiDet's ``dice_coefficient``).
DICE_EPS = 1e-5


def dice_loss(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample Dice loss ``1 − 2 Σ p·t / (Σ p² + Σ t² + eps)`` (AdelaiDet's form, squared denominators).

    Args:
        probs: (P, ...) float probabilities (for an ignore mask, multiply both inputs by it first).
        targets: (P, ...) float targets in [0, 1], same shape.

    Returns:
        (P,) float losses in [0, 1].

    Raises:
        ValueError: the shapes differ.
    """
    if probs.shape != targets.shape:
        raise ValueError(f"probs {tuple(probs.shape)} and targets {tuple(targets.shape)} differ in shape")
    p = probs.flatten(1)
    t = targets.flatten(1).to(p.dtype)
    inter = (p * t).sum(dim=1)
    union = (p * p).sum(dim=1) + (t * t).sum(dim=1) + DICE_EPS
    return 1.0 - 2.0 * inter / union


__all__ = ["DICE_EPS", "dice_loss"]
