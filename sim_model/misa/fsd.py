"""Frequency-Space Distillation (MISA, IJCAI 2024, §3.2, Eq. 3–6).

The dense features of the BSSS teacher S and of the instance network I (its mask-branch features after an
adaptation and a projector layer, :class:`FSDProjector`, as MGD/Yang et al. 2022) are split in the Fourier
domain into a high-pass and a low-pass part (Eq. 3–4); the high-frequency part is aligned inside the
boxes, the low-frequency part outside them (Eq. 5), with the L2 loss of Eq. 6.
"""
from __future__ import annotations

import torch
from torch import nn


def fourier_masks(height: int, width: int, theta: float, radius: float,
                  device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The high-pass and low-pass Fourier masks of the centred spectrum (MISA Eq. 4).

    High pass ``α_high``: θ where ``(i − H/2)² + (j − W/2)² ≤ t²``, 1 elsewhere (Eq. 4). Low pass ``α_low``:
    its mirror, 1 inside the radius and θ outside, so that ``α_high + α_low = 1 + θ`` everywhere (the
    identity when θ = 0). Indices are those of the spectrum after ``torch.fft.fftshift`` (zero frequency at
    (H//2, W//2)).

    Args:
        height, width: spatial size of the features (H, W), in feature cells.
        theta: θ in [0, 1] (``MODEL.MISA.FSD.THETA``, paper 0.2).
        radius: t, in frequency cells (``MODEL.MISA.FSD.RADIUS``, paper 10).

    Returns:
        (α_high, α_low): two (H, W) float32 tensors in [0, 1].

    Raises:
        ValueError: θ outside [0, 1], a negative radius or an empty size.
    """
    if not 0.0 <= theta <= 1.0:
        raise ValueError(f"theta must lie in [0, 1], got {theta}")
    if radius < 0 or height <= 0 or width <= 0:
        raise ValueError(f"need radius >= 0 and a non-empty size, got radius {radius}, size {height}x{width}")
    i = torch.arange(height, device=device, dtype=torch.float32)[:, None]
    j = torch.arange(width, device=device, dtype=torch.float32)[None, :]
    inside = (i - height // 2) ** 2 + (j - width // 2) ** 2 <= radius ** 2
    high = torch.where(inside, torch.full_like(i * j, theta), torch.ones_like(i * j))
    low = torch.where(inside, torch.ones_like(i * j), torch.full_like(i * j, theta))
    return high, low


def frequency_split(features: torch.Tensor, theta: float, radius: float) -> tuple[torch.Tensor, torch.Tensor]:
    """High- and low-frequency components of dense features (MISA Eq. 3): FFT over the two spatial
    dimensions, centred, multiplied by :func:`fourier_masks`, inverse FFT, real part.

    Args:
        features: (N, D, H, W) float features.
        theta, radius: θ and t of Eq. 4.

    Returns:
        (F′_high, F′_low): two (N, D, H, W) float32 tensors.
    """
    h, w = features.shape[-2:]
    high, low = fourier_masks(h, w, theta, radius, features.device)
    spectrum = torch.fft.fftshift(torch.fft.fft2(features.float(), norm="ortho"), dim=(-2, -1))

    def back(mask: torch.Tensor) -> torch.Tensor:
        return torch.fft.ifft2(torch.fft.ifftshift(spectrum * mask, dim=(-2, -1)), norm="ortho").real

    return back(high), back(low)


def fsd_loss(teacher_features: torch.Tensor, student_features: torch.Tensor, box_union: torch.Tensor,
             theta: float, radius: float, lambda_bg: float, lambda_fg: float) -> torch.Tensor:
    """The frequency-space distillation loss L_trans (MISA Eq. 5–6).

    ``λ_bg / (2 N_bg) · Σ (1 − B)(S′_low − I′_low)² + λ_fg / (2 N_fg) · Σ B (S′_high − I′_high)²``, the sums
    over the batch's cells and channels, N_bg / N_fg the numbers of background / foreground cells of the
    batch (a term without cells is 0).

    Args:
        teacher_features: S, (N, D, H, W) float (the BSSS teacher's dense features; not differentiated).
        student_features: I, (N, D, H, W) float (after :class:`FSDProjector`).
        box_union: B, (N, H, W) float/bool, 1 on cells inside any ground-truth box (Eq. 5).
        theta, radius: θ, t of Eq. 4; lambda_bg, lambda_fg: λ_bg, λ_fg of Eq. 6.

    Returns:
        Scalar float loss.

    Raises:
        ValueError: the shapes do not match.
    """
    if teacher_features.shape != student_features.shape or box_union.shape != student_features.shape[:1] + \
            student_features.shape[2:]:
        raise ValueError(f"shapes differ: S {tuple(teacher_features.shape)}, I {tuple(student_features.shape)}, "
                         f"B {tuple(box_union.shape)}")
    s_high, s_low = frequency_split(teacher_features.detach(), theta, radius)
    i_high, i_low = frequency_split(student_features, theta, radius)
    fg = box_union.float()[:, None]
    bg = 1.0 - fg
    n_fg = fg.sum().clamp(min=1.0)
    n_bg = bg.sum().clamp(min=1.0)
    loss_bg = ((s_low - i_low) ** 2 * bg).sum() * (lambda_bg / (2.0 * n_bg))
    loss_fg = ((s_high - i_high) ** 2 * fg).sum() * (lambda_fg / (2.0 * n_fg))
    return loss_bg + loss_fg


def standardize(features: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Each image's channels to zero mean and unit variance over space (``MODEL.MISA.FSD.NORMALIZE_TEACHER``).

    Args:
        features: (N, D, H, W) float.

    Returns:
        (N, D, H, W) float.
    """
    mean = features.mean(dim=(2, 3), keepdim=True)
    std = features.std(dim=(2, 3), keepdim=True, unbiased=False)
    return (features - mean) / (std + eps)


class FSDProjector(nn.Module):
    """Adaptation and projector layers before FSD (MISA §3.2, after MGD, Yang et al. 2022): a 1×1
    adaptation conv from the instance network's D′ mask-feature channels to the teacher's D, then a
    3×3 conv – ReLU – 3×3 conv projector. Used in training only.

    Args:
        in_channels: D′ (``MODEL.CONDINST.MASK_BRANCH.OUT_CHANNELS``).
        out_channels: D, the teacher's feature channels (``MODEL.BSSS.FEATURE_DIM`` of its config).
        hidden_channels: projector width (``MODEL.MISA.FSD.PROJECTOR_CHANNELS``; 0 = D).
    """

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int = 0):
        super().__init__()
        hidden = hidden_channels or out_channels
        self.adaptation = nn.Conv2d(in_channels, out_channels, 1)
        self.projector = nn.Sequential(nn.Conv2d(out_channels, hidden, 3, padding=1), nn.ReLU(inplace=True),
                                       nn.Conv2d(hidden, out_channels, 3, padding=1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(N, D′, H, W) float -> (N, D, H, W) float."""
        return self.projector(self.adaptation(features))


__all__ = ["fourier_masks", "frequency_split", "fsd_loss", "standardize", "FSDProjector"]
