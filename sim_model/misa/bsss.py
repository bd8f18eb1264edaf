"""The box-supervised semantic segmentation (BSSS) network, MISA's teacher (IJCAI 2024, §3.1 Eq. 1, §4.3).

``BoxSemSeg`` is registered in detectron2's ``META_ARCH_REGISTRY`` (``MODEL.META_ARCHITECTURE
"BoxSemSeg"``, ``configs/BSSS_EffLite0_FPN_cpu.yaml``) and trained with ``python -m training.train`` like the
instance network. It shares the instance network's backbone family so that FSD aligns like with like:

    backbone + FPN (P3–P5) → decoder to stride 8 (CondInst's mask-branch design,
    :class:`~sim_model.modeling.mask_head.MaskBranch`) → dense features S (N, D, H/8, W/8)
    → 1×1 classifier K over C classes + background → softmax (Eq. 1).

The paper uses SeMask as its BSSS framework and does not say how it is trained from boxes; ours takes
BoxInst's two terms to semantic maps, at stride 4 (the logits upsampled ×2):

- projection (``loss_sem_prj``): for every class c present in an image, the Dice of the x/y max-projections
  of the union of its boxes and of its probability map — inside that union its probability against
  background, p_c / (p_c + p_bg), elsewhere p_c. The two-way probability keeps the term as strong with 80
  classes as with one: on the full softmax p_c starts at 1/(C + 1), the unary soon gives background most
  of the mass, and the projection's gradient (through p_c(1 − p_c)) vanishes (on coco-mini, 700
  iterations, loss_sem_prj stayed at 1.6; with the two-way probability it falls to 0.25 — yet that teacher
  still predicts background almost everywhere, docs/benchmarks.md "MISA ladder"). Outside the union (where
  another class may win and p_c / (p_c + p_bg) would be meaningless) p_c itself. With one class the two
  are the same;
- pairwise (``loss_sem_pairwise``): ``−log Σ_c p_c(i) p_c(j)`` over neighbouring pairs inside any box
  whose LAB colour similarity reaches ``MODEL.BOXINST.PAIRWISE.COLOR_THRESH`` (BoxInst Eq. 3–4, same
  neighbourhood and warm-up ramp);
- unary (``loss_sem_unary``): ``−log P(label ∈ {background} ∪ {classes of the boxes covering the
  pixel})``, i.e. background outside all boxes and no class where no box of it lies.

No mask is ever used in training. :class:`SemanticMIoUEvaluator` measures the semantic mIoU against the
masks of a COCO json; :func:`load_semantic_teacher` loads a trained network as MISA's frozen teacher.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.structures import ImageList
from torch import nn

import sim_model.modeling.backbone  # noqa: F401  (registers the backbones)
from sim_model.config import BoxInstSettings, get_sim_cfg
from sim_model.losses.boxinst import (pairwise_warmup_factor, prepare_boxinst_targets, projection_loss_probs,
                                      unfold_wo_center)
from sim_model.modeling.mask_head import MaskBranch, aligned_bilinear
from sim_model.modeling.network import to_rgb


@META_ARCH_REGISTRY.register()
class BoxSemSeg(nn.Module):
    """Semantic segmentation trained from boxes (module docstring).

    Args:
        backbone: detectron2 backbone with FPN levels ``in_features``.
        decoder: FPN levels → S, (N, D, H/8, W/8).
        num_classes: C object classes (``MODEL.FCOS.NUM_CLASSES``); the classifier has C + 1 rows, the last
            one background.
        in_features: FPN levels of the decoder (``MODEL.CONDINST.MASK_BRANCH.IN_FEATURES``).
        pixel_mean, pixel_std, input_format, size_divisibility: as :class:`sim_model.condinst.CondInst`.
        out_stride: stride of the training losses (``MODEL.CONDINST.MASK_OUT_STRIDE``, 4).
        boxinst: the pairwise neighbourhood, colour threshold and warm-up (``MODEL.BOXINST``).
        projection_weight, pairwise_weight, unary_weight: ``MODEL.BSSS.*_WEIGHT``.
    """

    @configurable
    def __init__(self, *, backbone: nn.Module, decoder: nn.Module, num_classes: int, in_features: Sequence[str],
                 pixel_mean: Sequence[float], pixel_std: Sequence[float], input_format: str,
                 size_divisibility: int, out_stride: int, boxinst: BoxInstSettings, projection_weight: float,
                 pairwise_weight: float, unary_weight: float, feature_dim: int):
        super().__init__()
        self.backbone = backbone
        self.decoder = decoder
        self.classifier = nn.Conv2d(feature_dim, num_classes + 1, 1)
        self.feature_stride = backbone.output_shape()[in_features[0]].stride   # of S (FPN P3: 8)
        self.num_classes = num_classes
        self.feature_dim = feature_dim
        self.in_features = list(in_features)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))
        self.input_format = input_format
        self.size_divisibility = size_divisibility
        self.out_stride = out_stride
        self.boxinst = boxinst
        self.weights = {"loss_sem_prj": projection_weight, "loss_sem_pairwise": pairwise_weight,
                        "loss_sem_unary": unary_weight}

    @classmethod
    def from_config(cls, cfg):
        """detectron2's ``@configurable`` hook: ``MODEL.BSSS``, the backbone's keys, ``MODEL.FCOS.NUM_CLASSES``,
        ``MODEL.CONDINST.MASK_BRANCH.IN_FEATURES/NORM``, ``MODEL.BOXINST``, ``MODEL.PIXEL_MEAN/STD``,
        ``INPUT.FORMAT``.

        Raises:
            AttributeError: a key is missing (a plain detectron2 config).
        """
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        b = cfg.MODEL.BSSS
        in_features = list(cfg.MODEL.CONDINST.MASK_BRANCH.IN_FEATURES)
        decoder = MaskBranch(in_channels=shapes[in_features[0]].channels, num_levels=len(in_features),
                             channels=b.DECODER_CHANNELS, num_convs=b.DECODER_CONVS, out_channels=b.FEATURE_DIM,
                             norm=cfg.MODEL.CONDINST.MASK_BRANCH.NORM)
        return {"backbone": backbone, "decoder": decoder, "num_classes": cfg.MODEL.FCOS.NUM_CLASSES,
                "in_features": in_features, "pixel_mean": cfg.MODEL.PIXEL_MEAN, "pixel_std": cfg.MODEL.PIXEL_STD,
                "input_format": cfg.INPUT.FORMAT, "size_divisibility": cfg.MODEL.CONDINST.SIZE_DIVISIBILITY,
                "out_stride": cfg.MODEL.CONDINST.MASK_OUT_STRIDE, "boxinst": BoxInstSettings.from_cfg(cfg),
                "projection_weight": b.PROJECTION_WEIGHT, "pairwise_weight": b.PAIRWISE_WEIGHT,
                "unary_weight": b.UNARY_WEIGHT, "feature_dim": b.FEATURE_DIM}

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def class_weights(self) -> torch.Tensor:
        """K of MISA Eq. 1 over the C object classes: (C, D) float (the background row left out)."""
        return self.classifier.weight[: self.num_classes, :, 0, 0]

    def preprocess_image(self, images: Sequence[torch.Tensor]) -> ImageList:
        """(3, H, W) images in ``input_format`` → normalised, padded to ``size_divisibility``."""
        images = [(x.to(self.device).float() - self.pixel_mean) / self.pixel_std for x in images]
        return ImageList.from_tensors(images, self.size_divisibility)

    def check_input_like(self, input_format: str, size_divisibility: int) -> None:
        """Raise ValueError unless images prepared for a network with this ``INPUT.FORMAT`` and
        ``SIZE_DIVISIBILITY`` can be fed to this one (MISA: the student's raw batch goes to the teacher)."""
        if (input_format, size_divisibility) != (self.input_format, self.size_divisibility):
            raise ValueError(f"the BSSS teacher takes {self.input_format} images padded to {self.size_divisibility}, "
                             f"the instance network {input_format} / {size_divisibility}: train the teacher with "
                             f"the same INPUT.FORMAT and MODEL.CONDINST.SIZE_DIVISIBILITY")

    def dense_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """S and the class logits of a normalised, padded batch.

        Args:
            images: (N, 3, H, W) float, normalised and padded (:meth:`preprocess_image`).

        Returns:
            (S, logits): (N, D, H/s, W/s) and (N, C + 1, H/s, W/s) float, s = :attr:`feature_stride` (that of
            the first decoder level, FPN P3: 8).
        """
        feats = self.backbone(images)
        s = self.decoder([feats[f] for f in self.in_features])
        return s, self.classifier(s)

    def forward(self, batched_inputs: list[dict]):
        """detectron2 interface: training → dict of losses; eval → ``[{"sem_seg": (C + 1, H, W) float
        probabilities at the output size}]`` (``height``/``width`` of the input, default its image size)."""
        images = self.preprocess_image([x["image"] for x in batched_inputs])
        _, logits = self.dense_features(images.tensor)
        if not self.training:
            return self.inference(logits, images.image_sizes, batched_inputs)
        return self.losses(logits, images, batched_inputs)

    def losses(self, logits: torch.Tensor, images: ImageList, batched_inputs: list[dict]) -> dict[str, torch.Tensor]:
        """The three box-only losses of one batch (module docstring), weighted; advances ``iteration``.

        Args:
            logits: (N, C + 1, Hp/8, Wp/8) float.
            images: the normalised padded batch (sizes of the real images inside the padding).
            batched_inputs: detectron2 dicts with ``image`` and ``instances`` (``gt_boxes`` XYXY px,
                ``gt_classes`` in [0, C)).
        """
        it = int(self.iteration.item())
        gts = [x["instances"].to(self.device) for x in batched_inputs]
        boxes = [g.gt_boxes.tensor.float() for g in gts]
        classes = [g.gt_classes.long() for g in gts]
        rgb = ImageList.from_tensors([to_rgb(x["image"].to(self.device), self.input_format)
                                      for x in batched_inputs], self.size_divisibility)
        b = self.boxinst
        prep = prepare_boxinst_targets(rgb.tensor, images.image_sizes, boxes, self.out_stride, b.kernel_size,
                                       b.dilation, b.bottom_pixels_removed, b.sigma_scale)
        hm, wm = prep["color_similarity"].shape[-2:]
        logits = aligned_bilinear(logits, self.feature_stride // self.out_stride)[:, :, :hm, :wm]
        log_probs = F.log_softmax(logits, dim=1)
        losses = semantic_box_losses(log_probs, prep["box_masks"], classes,
                                     _valid_cells(images.image_sizes, (hm, wm), self.out_stride, self.device),
                                     prep["color_similarity"], b.color_thresh, b.kernel_size, b.dilation)
        ramp = pairwise_warmup_factor(it, b.warmup_iters)
        losses["loss_sem_pairwise"] = losses["loss_sem_pairwise"] * ramp
        with torch.no_grad():
            self.iteration += 1
        return {k: v * self.weights[k] for k, v in losses.items()}

    def inference(self, logits: torch.Tensor, image_sizes: Sequence[tuple[int, int]],
                  batched_inputs: list[dict]) -> list[dict]:
        """Class probabilities at each input's output size (``sem_seg``, (C + 1, H, W) float)."""
        probs = F.interpolate(logits, scale_factor=self.feature_stride, mode="bilinear",
                              align_corners=False).softmax(dim=1)
        out = []
        for i, x in enumerate(batched_inputs):
            h, w = image_sizes[i]
            p = probs[i:i + 1, :, :h, :w]
            oh, ow = int(x.get("height", h)), int(x.get("width", w))
            if (oh, ow) != (h, w):
                p = F.interpolate(p, size=(oh, ow), mode="bilinear", align_corners=False)
            out.append({"sem_seg": p[0]})
        return out


def _valid_cells(image_sizes: Sequence[tuple[int, int]], grid_hw: tuple[int, int], stride: int,
                 device: torch.device) -> torch.Tensor:
    """(N, Hm, Wm) bool: grid cells whose centre lies on the real image (not the padding)."""
    hm, wm = grid_hw
    ys = torch.arange(hm, device=device) * stride + stride // 2
    xs = torch.arange(wm, device=device) * stride + stride // 2
    return torch.stack([(ys[:, None] < h) & (xs[None, :] < w) for h, w in image_sizes])


def semantic_box_losses(log_probs: torch.Tensor, box_grid_masks: Sequence[torch.Tensor],
                        classes: Sequence[torch.Tensor], valid: torch.Tensor, color_similarity: torch.Tensor,
                        color_thresh: float, kernel_size: int, dilation: int) -> dict[str, torch.Tensor]:
    """BoxInst's terms on semantic maps plus the label-set unary (module docstring), unweighted.

    Args:
        log_probs: (N, C + 1, H, W) float log-softmax over C classes + background (last channel).
        box_grid_masks: N tensors (M_i, H, W) float {0, 1}, each box on the grid
            (:func:`~sim_model.losses.boxinst.prepare_boxinst_targets`).
        classes: N tensors (M_i,) long class of each box, in [0, C).
        valid: (N, H, W) bool, cells on the real image.
        color_similarity: (N, K·K − 1, H, W) float LAB similarity of each cell with its neighbours.
        color_thresh, kernel_size, dilation: BoxInst's pairwise settings (0.3, 3, 2).

    Returns:
        ``{"loss_sem_prj", "loss_sem_pairwise", "loss_sem_unary"}`` scalars (0 with a graph when nothing to
        supervise).
    """
    n, c1, h, w = log_probs.shape
    bg = c1 - 1
    allowed = torch.zeros((n, c1, h, w), dtype=torch.bool, device=log_probs.device)
    allowed[:, bg] = True
    prj_probs, prj_targets = [], []
    for i in range(n):
        m, cls = box_grid_masks[i], classes[i]
        for c in cls.unique().tolist():
            union = m[cls == c].amax(dim=0) > 0
            allowed[i, c] |= union
            two_way = log_probs[i, c] - torch.logaddexp(log_probs[i, c], log_probs[i, bg])
            prj_probs.append(torch.where(union, two_way, log_probs[i, c]).exp())
            prj_targets.append(union.float())
    zero = log_probs.sum() * 0
    prj = (projection_loss_probs(torch.stack(prj_probs)[:, None], torch.stack(prj_targets)[:, None])
           if prj_probs else zero)
    masked = log_probs.masked_fill(~allowed, float("-inf"))
    unary_px = -torch.logsumexp(masked, dim=1)
    unary = (unary_px * valid).sum() / valid.sum().clamp(min=1)
    inside = (allowed[:, :bg].any(dim=1) & valid).float()          # (N, H, W): cells inside any box
    pairs = (color_similarity >= color_thresh).float() * inside[:, None]
    nbr = unfold_wo_center(log_probs, kernel_size, dilation)        # (N, C+1, K, H, W)
    same = torch.logsumexp(log_probs[:, :, None] + nbr, dim=1)      # log Σ_c p_c(i) p_c(j)
    pairwise = -(same * pairs).sum() / pairs.sum().clamp(min=1.0)
    return {"loss_sem_prj": prj, "loss_sem_pairwise": pairwise, "loss_sem_unary": unary}


class SemanticMIoUEvaluator(DatasetEvaluator):
    """Semantic mIoU of a :class:`BoxSemSeg` against the instance masks of a registered COCO dataset.

    The ground truth of an image: each annotation's mask (pycocotools ``annToMask``) painted with its class,
    background elsewhere; crowd regions and the boxes of annotations without a mask are ignored. The prediction: argmax of
    ``sem_seg``. Results (percent, like detectron2's ``SemSegEvaluator``): ``{"sem_seg": {"mIoU": over
    background and the classes that occur in the ground truth or the prediction, "mIoU_fg": the same
    without background, "IoU-background": …, "pixel_acc": …}}``.

    Args:
        dataset_name: a dataset registered with a ``json_file`` (``training.data.register_coco``); class c is
            the c-th category in id order (detectron2's contiguous ids).
    """

    def __init__(self, dataset_name: str):
        from pycocotools.coco import COCO

        self._coco = COCO(MetadataCatalog.get(dataset_name).json_file)
        # detectron2's contiguous ids: the categories in id order (as load_coco_json assigns them)
        self._to_contiguous = {c: i for i, c in enumerate(sorted(self._coco.getCatIds()))}
        self._num_classes = len(self._to_contiguous)
        self.reset()

    def reset(self):
        self._confusion = np.zeros((self._num_classes + 1,) * 2, dtype=np.int64)

    def ground_truth(self, image_id: int) -> np.ndarray:
        """(H, W) int64: class id per pixel, C = background, −1 = ignored."""
        info = self._coco.imgs[image_id]
        gt = np.full((info["height"], info["width"]), self._num_classes, dtype=np.int64)
        for ann in self._coco.imgToAnns.get(image_id, []):
            c = self._to_contiguous[ann["category_id"]]
            if ann.get("iscrowd", 0) and ann.get("segmentation"):
                gt[self._coco.annToMask(ann) > 0] = -1
            elif ann.get("segmentation"):
                gt[self._coco.annToMask(ann) > 0] = c
            else:
                x, y, bw, bh = (int(round(v)) for v in ann["bbox"])
                gt[max(y, 0): y + bh, max(x, 0): x + bw] = -1
        return gt

    def process(self, inputs, outputs):
        k = self._num_classes + 1
        for x, o in zip(inputs, outputs):
            gt = self.ground_truth(int(x["image_id"]))
            pred = o["sem_seg"].argmax(dim=0).cpu().numpy()
            if pred.shape != gt.shape:
                raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in size")
            keep = gt >= 0
            self._confusion += np.bincount(gt[keep] * k + pred[keep], minlength=k * k).reshape(k, k)

    def evaluate(self):
        return {"sem_seg": semantic_miou(self._confusion)}


def semantic_miou(confusion: np.ndarray) -> dict[str, float]:
    """IoU per class from a confusion matrix (rows ground truth, columns prediction; last = background).

    Returns:
        ``{"mIoU", "mIoU_fg", "IoU-background", "pixel_acc"}`` in percent; classes absent from both ground
        truth and prediction are left out of the means.
    """
    tp = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - tp
    present = union > 0
    iou = np.where(present, tp / np.maximum(union, 1), np.nan)
    fg = iou[:-1][present[:-1]]
    return {"mIoU": float(np.nanmean(iou[present]) * 100) if present.any() else float("nan"),
            "mIoU_fg": float(fg.mean() * 100) if fg.size else float("nan"),
            "IoU-background": float(iou[-1] * 100),
            "pixel_acc": float(tp.sum() / max(confusion.sum(), 1) * 100)}


def load_semantic_teacher(config_file: str, weights: str, device: torch.device | str = "cpu") -> BoxSemSeg:
    """A trained :class:`BoxSemSeg` as MISA's frozen teacher (eval mode, no gradients).

    Args:
        config_file: its ``config.yaml`` (``MODEL.MISA.TEACHER.CONFIG``).
        weights: its checkpoint (``MODEL.MISA.TEACHER.WEIGHTS``).
        device: where to put it.

    Returns:
        The :class:`BoxSemSeg` with its checkpoint's weights, in eval mode, every parameter frozen.

    Raises:
        FileNotFoundError: either file is missing (the message names the config key).
        ValueError: the config is not a ``BoxSemSeg`` config.
    """
    from detectron2.modeling import build_model

    for key, path in (("MODEL.MISA.TEACHER.CONFIG", config_file), ("MODEL.MISA.TEACHER.WEIGHTS", weights)):
        if not path or not os.path.isfile(path):
            raise FileNotFoundError(f"MISA needs its trained BSSS teacher: {key} = {path!r} is not a file "
                                    f"(train one with python -m training.train --config "
                                    f"configs/BSSS_EffLite0_FPN_cpu.yaml)")
    cfg = get_sim_cfg()
    cfg.merge_from_file(config_file)
    if cfg.MODEL.META_ARCHITECTURE != "BoxSemSeg":
        raise ValueError(f"{config_file} is a {cfg.MODEL.META_ARCHITECTURE} config, not a BoxSemSeg (BSSS) one")
    cfg.MODEL.DEVICE = str(device)
    model = build_model(cfg)
    DetectionCheckpointer(model).load(weights)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


__all__ = ["BoxSemSeg", "semantic_box_losses", "SemanticMIoUEvaluator", "semantic_miou", "load_semantic_teacher"]
