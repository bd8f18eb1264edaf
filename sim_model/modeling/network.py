"""The trainable CondInst network: backbone + FPN, FCOS head with controller, mask branch, dynamic mask head.

:class:`CondInstNet` is the part that both the student and SIM's momentum teacher are (the teacher is an
EMA copy of exactly this module); :func:`build_condinst_net` builds it from a config with the keys of
:func:`sim_model.config.add_sim_config`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from detectron2.config import CfgNode
from detectron2.modeling import build_backbone
from torch import nn

from sim_model.modeling.fcos import FCOS, HeadOutputs
from sim_model.modeling.mask_head import DynamicMaskHead, MaskBranch


@dataclass
class NetOutputs:
    """One pass of :class:`CondInstNet` on a batch.

    Attributes:
        head: FCOS outputs (:class:`~sim_model.modeling.fcos.HeadOutputs`).
        mask_feats: (N, D, H/8, W/8) float mask features Z at stride 8 (mask-branch output).
    """

    head: HeadOutputs
    mask_feats: torch.Tensor

    def detach(self) -> "NetOutputs":
        """The same outputs cut from the autograd graph (locations, levels and strides are constants)."""
        h = self.head
        return NetOutputs(
            head=HeadOutputs(h.logits.detach(), h.bbox_reg.detach(), h.ctrness.detach(), h.top_feats.detach(),
                             h.locations, h.levels, h.strides),
            mask_feats=self.mask_feats.detach())


class CondInstNet(nn.Module):
    """The trainable network: backbone+FPN, FCOS head with controller, mask branch, dynamic mask head.

    Args:
        backbone: detectron2 backbone returning the FPN levels named in ``in_features``.
        fcos: the FCOS head (:class:`~sim_model.modeling.fcos.FCOS`).
        mask_branch, mask_head: CondInst's mask branch and dynamic mask head.
        in_features: FPN levels of the FCOS head (``MODEL.FCOS.IN_FEATURES``).
        mask_in_features: FPN levels of the mask branch (``MODEL.CONDINST.MASK_BRANCH.IN_FEATURES``).
    """

    def __init__(self, backbone: nn.Module, fcos: FCOS, mask_branch: MaskBranch, mask_head: DynamicMaskHead,
                 in_features: Sequence[str], mask_in_features: Sequence[str]):
        super().__init__()
        self.backbone = backbone
        self.fcos = fcos
        self.mask_branch = mask_branch
        self.mask_head = mask_head
        self.in_features = list(in_features)
        self.mask_in_features = list(mask_in_features)

    def forward(self, images: torch.Tensor, with_cls: bool = True) -> NetOutputs:
        """One pass.

        Args:
            images: (N, 3, H, W) float normalised images, padded to the size divisibility.
            with_cls: False skips the classification branch (the SIM teacher needs no class scores).

        Returns:
            :class:`NetOutputs`.
        """
        features = self.backbone(images)
        head = self.fcos([features[f] for f in self.in_features], with_cls=with_cls)
        mask_feats = self.mask_branch([features[f] for f in self.mask_in_features])
        return NetOutputs(head=head, mask_feats=mask_feats)

    def mask_logits(self, out: NetOutputs, im_inds: torch.Tensor, loc_inds: torch.Tensor) -> torch.Tensor:
        """Dynamic-head mask logits of the instances at locations ``loc_inds`` of images ``im_inds``.

        Args:
            out: a pass of this network.
            im_inds, loc_inds: (P,) long image index and location index (into ``out.head``) of each instance.

        Returns:
            (P, 1, H/4, W/4) float mask logits at the mask-output stride.
        """
        head = out.head
        params = head.top_feats[im_inds, loc_inds]
        return self.mask_head(out.mask_feats, params, im_inds, head.locations[loc_inds], head.levels[loc_inds])


def to_rgb(image: torch.Tensor, input_format: str) -> torch.Tensor:
    """An input image as the colour losses want it.

    Args:
        image: (3, H, W) uint8/float in ``input_format`` (``INPUT.FORMAT``: "RGB" or "BGR"), values [0, 255].

    Returns:
        (3, H, W) float32 RGB in [0, 255].
    """
    image = image.float()
    return image.flip(0) if input_format == "BGR" else image


def build_condinst_net(cfg: CfgNode) -> CondInstNet:
    """The network of ``cfg`` (``MODEL.BACKBONE``, ``MODEL.FCOS``, ``MODEL.CONDINST``)."""
    backbone = build_backbone(cfg)
    shapes = backbone.output_shape()
    c = cfg.MODEL.CONDINST
    f = cfg.MODEL.FCOS
    in_features = list(f.IN_FEATURES)
    soi = list(f.SIZES_OF_INTEREST)
    mask_head = DynamicMaskHead(
        in_channels=c.MASK_BRANCH.OUT_CHANNELS, channels=c.MASK_HEAD.CHANNELS,
        num_layers=c.MASK_HEAD.NUM_LAYERS, sizes_of_interest=soi + [soi[-1] * 2],
        mask_feat_stride=shapes[c.MASK_BRANCH.IN_FEATURES[0]].stride, mask_out_stride=c.MASK_OUT_STRIDE,
        disable_rel_coords=c.MASK_HEAD.DISABLE_REL_COORDS)
    fcos = FCOS(
        in_channels=shapes[in_features[0]].channels, num_classes=f.NUM_CLASSES,
        strides=[shapes[k].stride for k in in_features], num_params=mask_head.num_params,
        sizes_of_interest=soi, center_sample=f.CENTER_SAMPLE, pos_radius=f.POS_RADIUS,
        focal_alpha=f.LOSS_ALPHA, focal_gamma=f.LOSS_GAMMA, pre_nms_thresh_test=f.INFERENCE_TH_TEST,
        pre_nms_topk_test=f.PRE_NMS_TOPK_TEST, post_nms_topk_test=f.POST_NMS_TOPK_TEST, nms_thresh=f.NMS_TH,
        thresh_with_ctr=f.THRESH_WITH_CTR, num_cls_convs=f.NUM_CLS_CONVS, num_box_convs=f.NUM_BOX_CONVS,
        num_share_convs=f.NUM_SHARE_CONVS, norm=f.NORM, prior_prob=f.PRIOR_PROB, use_scale=f.USE_SCALE,
        centerness_on_reg=f.CENTERNESS_ON_REG)
    mask_branch = MaskBranch(
        in_channels=shapes[c.MASK_BRANCH.IN_FEATURES[0]].channels, num_levels=len(c.MASK_BRANCH.IN_FEATURES),
        channels=c.MASK_BRANCH.CHANNELS, num_convs=c.MASK_BRANCH.NUM_CONVS,
        out_channels=c.MASK_BRANCH.OUT_CHANNELS, norm=c.MASK_BRANCH.NORM)
    return CondInstNet(backbone, fcos, mask_branch, mask_head, in_features, c.MASK_BRANCH.IN_FEATURES)


__all__ = ["NetOutputs", "CondInstNet", "build_condinst_net", "to_rgb"]
