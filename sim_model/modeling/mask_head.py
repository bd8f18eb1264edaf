"""CondInst's mask branch and dynamic mask head (Tian et al., ECCV 2020; AdelaiDet's implementation).

The mask branch turns FPN P3–P5 into the mask features Z: (N, D, H/8, W/8), D = 16 (SIM's official
code). The dynamic mask head runs, for each instance, a tiny fully convolutional network (3 layers of
1x1 convs, 8 channels) whose weights are predicted by the FCOS controller, on Z concatenated with the
coordinates relative to the instance's location; its output logits are upsampled by 2 to stride 4.
:func:`sample_mask_positives` picks which positives' masks a training step computes.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d, get_norm
from torch import nn

from .fcos import HeadOutputs, Positives, compute_locations


def aligned_bilinear(tensor: torch.Tensor, factor: int) -> torch.Tensor:
    """Upsample (N, C, H, W) by an integer factor keeping pixel centres aligned (AdelaiDet).

    Returns:
        (N, C, H*factor, W*factor).
    """
    if tensor.dim() != 4:
        raise ValueError(f"expected (N, C, H, W), got {tuple(tensor.shape)}")
    factor = int(factor)
    if factor < 1:
        raise ValueError(f"factor must be >= 1, got {factor}")
    if factor == 1:
        return tensor
    h, w = tensor.shape[2:]
    tensor = F.pad(tensor, pad=(0, 1, 0, 1), mode="replicate")
    oh, ow = factor * h + 1, factor * w + 1
    tensor = F.interpolate(tensor, size=(oh, ow), mode="bilinear", align_corners=True)
    tensor = F.pad(tensor, pad=(factor // 2, 0, factor // 2, 0), mode="replicate")
    return tensor[:, :, : oh - 1, : ow - 1]


class MaskBranch(nn.Module):
    """FPN levels -> mask features Z (N, D, H/8, W/8) at the stride of the first input level.

    Args:
        in_channels: FPN channels.
        num_levels: number of FPN inputs (P3, P4, P5 -> 3).
        channels: hidden channels (AdelaiDet 128).
        num_convs: convs of the tower after the fusion (AdelaiDet 4).
        out_channels: D (``MODEL.CONDINST.MASK_BRANCH.OUT_CHANNELS``, 16).
        norm: "BN", "GN", "SyncBN", "" ...
    """

    def __init__(self, in_channels: int, num_levels: int, channels: int, num_convs: int, out_channels: int,
                 norm: str = "BN"):
        super().__init__()

        def conv_norm_relu(cin, cout):
            return nn.Sequential(
                Conv2d(cin, cout, 3, padding=1, bias=not norm, norm=get_norm(norm, cout) if norm else None),
                nn.ReLU())

        self.refine = nn.ModuleList([conv_norm_relu(in_channels, channels) for _ in range(num_levels)])
        tower = [conv_norm_relu(channels, channels) for _ in range(num_convs)]
        tower.append(nn.Conv2d(channels, out_channels, 1))
        self.tower = nn.Sequential(*tower)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Fuse the FPN levels into the mask features.

        Args:
            features: ``num_levels`` float tensors (the module's dtype and device), finest first (P3, P4,
                P5), level l of shape (N, in_channels, H_l, W_l), each exactly ``H_0 / H_l`` times coarser
                than the first (FPN strides 8, 16, 32 of images padded to ``SIZE_DIVISIBILITY``: factors
                1, 2, 4). Each goes through its 3x3 conv, is upsampled by the factor ``H_0 // H_l``
                (:func:`aligned_bilinear`), cropped to (H_0, W_0) and added.

        Returns:
            Z: (N, out_channels, H_0, W_0) float, dtype and device of the inputs (stride 8 with P3 first).

        Raises:
            ValueError: a level finer than the first (factor 0).
            RuntimeError: a level whose upsampled size does not cover (H_0, W_0) (sizes not in integer
                ratios, e.g. unpadded images).
            IndexError: more levels than ``num_levels``.
        """
        x = None
        for i, f in enumerate(features):
            y = self.refine[i](f)
            if x is None:
                x = y
            else:
                factor = x.shape[2] // y.shape[2]
                y = aligned_bilinear(y, factor)[:, :, : x.shape[2], : x.shape[3]]
                x = x + y
        return self.tower(x)


class DynamicMaskHead(nn.Module):
    """Per-instance 1x1-conv mask FCN whose parameters come from the controller (CondInst).

    Args:
        in_channels: D, channels of the mask features.
        channels: hidden channels (``MODEL.CONDINST.MASK_HEAD.CHANNELS``, 8).
        num_layers: layers (``MODEL.CONDINST.MASK_HEAD.NUM_LAYERS``, 3).
        sizes_of_interest: per FPN level, the scale dividing the relative coordinates
            (AdelaiDet: 64, 128, 256, 512, 1024).
        mask_feat_stride: stride of the mask features (8).
        mask_out_stride: stride of the output logits (4).
        disable_rel_coords: drop the two relative-coordinate channels.
    """

    def __init__(self, in_channels: int, channels: int, num_layers: int, sizes_of_interest: Sequence[float],
                 mask_feat_stride: int = 8, mask_out_stride: int = 4, disable_rel_coords: bool = False):
        super().__init__()
        if mask_feat_stride % mask_out_stride != 0:
            raise ValueError("mask_feat_stride must be a multiple of mask_out_stride")
        self.in_channels = in_channels
        self.channels = channels
        self.num_layers = num_layers
        self.mask_feat_stride = mask_feat_stride
        self.mask_out_stride = mask_out_stride
        self.disable_rel_coords = disable_rel_coords
        self.register_buffer("sizes_of_interest", torch.tensor(list(sizes_of_interest), dtype=torch.float32),
                             persistent=False)
        first_in = in_channels + (0 if disable_rel_coords else 2)
        self.weight_nums, self.bias_nums = [], []
        for layer in range(num_layers):
            cin = first_in if layer == 0 else channels
            cout = 1 if layer == num_layers - 1 else channels
            self.weight_nums.append(cin * cout)
            self.bias_nums.append(cout)
        self.num_params = sum(self.weight_nums) + sum(self.bias_nums)

    def _parse_params(self, params: torch.Tensor):
        """(P, num_params) -> per layer weights (P, C_out, C_in) and biases (P, C_out, 1)."""
        n = params.shape[0]
        splits = torch.split(params, self.weight_nums + self.bias_nums, dim=1)
        ws, bs = splits[: self.num_layers], splits[self.num_layers:]
        weights, biases = [], []
        for layer in range(self.num_layers):
            cout = 1 if layer == self.num_layers - 1 else self.channels
            weights.append(ws[layer].reshape(n, cout, -1))
            biases.append(bs[layer].reshape(n, cout, 1))
        return weights, biases

    def forward(self, mask_feats: torch.Tensor, params: torch.Tensor, im_inds: torch.Tensor,
                locations: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """Mask logits of P instances.

        Args:
            mask_feats: (N, D, Hf, Wf) mask features Z at ``mask_feat_stride``.
            params: (P, num_params) controller outputs of the instances' locations.
            im_inds: (P,) long image of each instance.
            locations: (P, 2) (x, y) pixel location of each instance (its FCOS location).
            levels: (P,) long FPN level of each instance.

        Returns:
            (P, 1, Hf * s, Wf * s) mask logits at ``mask_out_stride`` (s = feat / out stride).
        """
        n_inst = params.shape[0]
        _, d, h, w = mask_feats.shape
        factor = self.mask_feat_stride // self.mask_out_stride
        if n_inst == 0:
            # keep both inputs in the graph (DDP expects every parameter to get a gradient)
            return mask_feats.new_zeros((0, 1, h * factor, w * factor)) + (params.sum() + mask_feats.sum()) * 0
        x = mask_feats[im_inds].reshape(n_inst, d, h * w)
        if not self.disable_rel_coords:
            grid = compute_locations(h, w, self.mask_feat_stride, mask_feats.device)  # (HW, 2)
            rel = (locations.reshape(-1, 1, 2) - grid.reshape(1, -1, 2)).permute(0, 2, 1)
            rel = rel / self.sizes_of_interest[levels].reshape(-1, 1, 1)
            x = torch.cat([rel.to(x.dtype), x], dim=1)
        # The per-instance 1x1 convs as batched matrix products (same result as CondInst's grouped
        # conv with groups = P, much faster on a CPU).
        weights, biases = self._parse_params(params)
        for layer, (wt, b) in enumerate(zip(weights, biases)):
            x = torch.baddbmm(b, wt, x)  # (P, C_out, HW)
            if layer < self.num_layers - 1:
                x = F.relu(x)
        logits = x.reshape(n_inst, 1, h, w)
        return aligned_bilinear(logits, factor)


def sample_mask_positives(head: HeadOutputs, positives: Positives, topk_per_image: int,
                          max_proposals: int = -1) -> torch.Tensor:
    """Indices of the positives whose masks are trained (AdelaiDet's CondInst sampling).

    ``max_proposals`` != -1: a random subset of that size (``MODEL.CONDINST.MAX_PROPOSALS``); else, per
    image, at most ``topk_per_image / (objects in the image)`` positives per object, those with the highest
    classification probability × centerness (``MODEL.CONDINST.TOPK_PROPOSALS_PER_IM``; -1 = all).

    Args:
        head: the student's FCOS outputs.
        positives: every positive of the batch.
        topk_per_image, max_proposals: see above.

    Returns:
        (P',) long indices into ``positives``.
    """
    im_inds, loc_inds, gt_inds = positives.image, positives.location, positives.object
    n = im_inds.numel()
    if max_proposals != -1 and n > max_proposals:
        return torch.randperm(n, device=im_inds.device)[:max_proposals]
    if topk_per_image == -1:
        return torch.arange(n, device=im_inds.device)
    keep = []
    with torch.no_grad():
        quality = head.logits[im_inds, loc_inds].sigmoid().max(dim=1).values * \
            head.ctrness[im_inds, loc_inds].sigmoid()
    for im in im_inds.unique().tolist():
        in_im = torch.nonzero(im_inds == im).squeeze(1)
        gts = gt_inds[in_im].unique()
        per_gt = max(int(topk_per_image / len(gts)), 1)
        for g in gts.tolist():
            idx = in_im[gt_inds[in_im] == g]
            if idx.numel() > per_gt:
                idx = idx[quality[idx].topk(per_gt).indices]
            keep.append(idx)
    if not keep:
        return torch.zeros(0, dtype=torch.long, device=im_inds.device)
    return torch.cat(keep)
