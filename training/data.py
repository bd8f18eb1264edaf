"""Dataset registration and the training data mapper (boxes, and the masks annotators drew) for the
CondInst/SIM network.

Any COCO-format json + image folder is registered with detectron2's ``register_coco_instances``
(pycocotools underneath); its ``thing_classes`` come from the json's categories. Training uses boxes:
the mapper drops every polygon/RLE, except on the annotations marked ``"mask_supervised": true`` (the
masks annotators drew or corrected, :data:`training.coco.MASK_SUPERVISED_KEY`), which become ``gt_masks`` of their
instances. A COCO json without that key (e.g. a public dataset with masks everywhere) trains from boxes
only.

With ``INPUT.BOX_CROP.ENABLED`` a share of the views are box-centred crops (:class:`BoxCenteredCrop`):
the window of :func:`sim_model.boxes.context_window` around one randomly drawn box, resized to
``INPUT.BOX_CROP.MIN_SIZE_TRAIN`` — the scale at which the SIM engine's close look sees a box. Such a
view cuts many of the other objects it holds; a cut object's box, clipped to the view, is no longer
tight along the cut, so the instances get ``gt_box_tight`` ((M,) bool): False where less than
``INPUT.BOX_CROP.MASK_MIN_VISIBLE`` of the box area is inside the view (those train detection, not masks;
:mod:`sim_model.condinst`).
"""
from __future__ import annotations

import copy
import logging
import os

import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.data.datasets import load_coco_json
from detectron2.structures import BitMasks, BoxMode, polygons_to_bitmask
from pycocotools import mask as mask_util

from sim_model.boxes import context_window, visible_box_share
from training.coco import MASK_SUPERVISED_KEY

logger = logging.getLogger(__name__)


def register_coco(name: str, json_file: str, image_root: str) -> str:
    """Register a COCO-format dataset under ``name`` (idempotent for the same files).

    Args:
        name: detectron2 dataset name, e.g. "coco_mini_train".
        json_file: COCO instances json (boxes required; masks used only for evaluation).
        image_root: folder holding the images named by ``file_name``.

    Returns:
        ``name``.

    Raises:
        FileNotFoundError: a path does not exist.
        ValueError: ``name`` is already registered with different files.
    """
    json_file = os.path.abspath(json_file)
    image_root = os.path.abspath(image_root)
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"COCO json not found: {json_file}")
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"image folder not found: {image_root}")
    if name in DatasetCatalog.list():
        meta = MetadataCatalog.get(name)
        if getattr(meta, "json_file", None) == json_file and getattr(meta, "image_root", None) == image_root:
            return name
        raise ValueError(f"dataset {name!r} is already registered with {getattr(meta, 'json_file', None)}")
    DatasetCatalog.register(name, lambda: load_coco_json(json_file, image_root, name,
                                                         extra_annotation_keys=[MASK_SUPERVISED_KEY]))
    MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root, evaluator_type="coco")
    return name


def dataset_classes(name: str) -> list[str]:
    """Class names (``thing_classes``) of a registered dataset, in contiguous-id order."""
    meta = MetadataCatalog.get(name)
    if not hasattr(meta, "thing_classes"):
        DatasetCatalog.get(name)  # loading the json fills the metadata
    return list(MetadataCatalog.get(name).thing_classes)


class BoxCenteredCrop(T.Augmentation):
    """Crop the window around one randomly drawn box (:func:`sim_model.boxes.context_window`).

    Args:
        context: (min, max) window side / box side, drawn uniformly per view.
        jitter: the window centre moves by up to ± ``jitter`` box widths / heights.
    """

    def __init__(self, context: tuple[float, float], jitter: float):
        super().__init__()
        self.context = (float(context[0]), float(context[1]))
        self.jitter = float(jitter)

    def get_transform(self, image: np.ndarray, boxes: np.ndarray) -> T.Transform:
        """A ``CropTransform`` of the window around one of ``boxes`` ((N, 4) float XYXY px); no-op without boxes."""
        if boxes is None or len(boxes) == 0:
            return T.NoOpTransform()
        box = boxes[np.random.randint(len(boxes))]
        shift = tuple(np.random.uniform(-self.jitter, self.jitter, size=2))
        x0, y0, x1, y1 = context_window(box, image.shape[:2], np.random.uniform(*self.context), shift)
        return T.CropTransform(x0, y0, x1 - x0, y1 - y0)


class BoxOnlyDatasetMapper:
    """detectron2 mapper for box-supervised training: image + ``gt_boxes`` / ``gt_classes``, and
    ``gt_masks`` (BitMasks, all-zero rows) + ``gt_mask_supervised`` ((M,) bool) for the instances whose
    mask supervises them, and ``gt_box_tight`` ((M,) bool: the box is tight in this view, module docstring).

    Augmentations: ``ResizeShortestEdge(INPUT.MIN_SIZE_TRAIN, INPUT.MAX_SIZE_TRAIN)`` and a horizontal
    flip (``INPUT.RANDOM_FLIP``); with ``INPUT.BOX_CROP.ENABLED``, a share ``INPUT.BOX_CROP.PROB`` of the
    views is a :class:`BoxCenteredCrop` resized by ``INPUT.BOX_CROP.MIN/MAX_SIZE_TRAIN`` instead. Output
    ``image`` is (3, H, W) uint8 in ``INPUT.FORMAT``. Annotations with ``iscrowd`` are dropped; boxes
    that become empty (cropped away) are filtered.
    """

    def __init__(self, cfg, is_train: bool = True):
        self.is_train = is_train
        self.augmentations = T.AugmentationList(utils.build_augmentation(cfg, is_train))
        self.image_format = cfg.INPUT.FORMAT
        bc = cfg.INPUT.BOX_CROP
        self.box_crop_prob = float(bc.PROB) if (is_train and bc.ENABLED) else 0.0
        self.mask_min_visible = float(bc.MASK_MIN_VISIBLE)
        flip = [T.RandomFlip()] if cfg.INPUT.RANDOM_FLIP == "horizontal" else []
        self.box_crop = T.AugmentationList([
            BoxCenteredCrop(tuple(bc.CONTEXT), bc.JITTER),
            T.ResizeShortestEdge(tuple(bc.MIN_SIZE_TRAIN), bc.MAX_SIZE_TRAIN, "choice")] + flip)

    def __call__(self, dataset_dict: dict) -> dict:
        d = copy.deepcopy(dataset_dict)
        image = utils.read_image(d["file_name"], format=self.image_format)
        utils.check_image_size(d, image)
        annos = [obj for obj in d.pop("annotations", []) if obj.get("iscrowd", 0) == 0]
        boxes = np.array([BoxMode.convert(obj["bbox"], obj["bbox_mode"], BoxMode.XYXY_ABS) for obj in annos],
                         np.float32).reshape(-1, 4)
        crop = self.box_crop_prob > 0 and len(boxes) and np.random.rand() < self.box_crop_prob
        image_before = image
        aug_input = T.AugInput(image, boxes=boxes)
        transforms = (self.box_crop if crop else self.augmentations)(aug_input)
        image = aug_input.image
        h, w = image.shape[:2]
        d["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if not self.is_train:
            return d
        instances = utils.annotations_to_instances(
            [utils.transform_instance_annotations({k: obj[k] for k in ("bbox", "bbox_mode", "category_id")},
                                                  transforms, (h, w)) for obj in annos], (h, w))
        supervised = [bool(obj.get(MASK_SUPERVISED_KEY)) and bool(obj.get("segmentation")) for obj in annos]
        if any(supervised):
            masks = np.zeros((len(annos), h, w), bool)
            for i, obj in enumerate(annos):
                if supervised[i]:
                    full = _mask_of(obj["segmentation"], *dataset_dict_size(dataset_dict, image_before))
                    masks[i] = transforms.apply_segmentation(full.astype(np.uint8)).astype(bool)
            instances.gt_masks = BitMasks(torch.from_numpy(masks))
        instances.gt_mask_supervised = torch.tensor(supervised, dtype=torch.bool).reshape(-1)
        instances.gt_box_tight = visible_box_share(transforms.apply_box(boxes), (h, w)) >= self.mask_min_visible
        d["instances"] = utils.filter_empty_instances(instances, by_mask=False)
        return d


def dataset_dict_size(dataset_dict: dict, image: np.ndarray) -> tuple[int, int]:
    """(h, w) of a dataset dict's image as read (the json's ``height``/``width`` when present)."""
    return int(dataset_dict.get("height", image.shape[0])), int(dataset_dict.get("width", image.shape[1]))


def _mask_of(segmentation, h: int, w: int) -> np.ndarray:
    """(h, w) bool of a COCO segmentation: polygons (a list of lists) or an RLE (compressed or not)."""
    if isinstance(segmentation, list):
        return polygons_to_bitmask(segmentation, h, w)
    if isinstance(segmentation.get("counts"), list):
        segmentation = mask_util.frPyObjects(segmentation, h, w)
    return mask_util.decode(segmentation).astype(bool)
