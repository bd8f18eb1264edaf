"""Dataset registration and the training data mapper (boxes only) for the CondInst/SIM network.

Any COCO-format json + image folder is registered with detectron2's ``register_coco_instances``
(pycocotools underneath); its ``thing_classes`` come from the json's categories. Training uses boxes
only: the mapper drops polygons/RLE so the network can never see a mask.
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
from detectron2.data.datasets import register_coco_instances

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
    register_coco_instances(name, {}, json_file, image_root)
    return name


def dataset_classes(name: str) -> list[str]:
    """Class names (``thing_classes``) of a registered dataset, in contiguous-id order."""
    meta = MetadataCatalog.get(name)
    if not hasattr(meta, "thing_classes"):
        DatasetCatalog.get(name)  # loading the json fills the metadata
    return list(MetadataCatalog.get(name).thing_classes)


class BoxOnlyDatasetMapper:
    """detectron2 mapper for box-supervised training: image + ``gt_boxes`` / ``gt_classes`` only.

    Augmentations: ``ResizeShortestEdge(INPUT.MIN_SIZE_TRAIN, INPUT.MAX_SIZE_TRAIN)`` and a horizontal
    flip (``INPUT.RANDOM_FLIP``). Output ``image`` is (3, H, W) uint8 in ``INPUT.FORMAT``.
    Annotations with ``iscrowd`` are dropped; boxes that become empty are filtered.
    """

    def __init__(self, cfg, is_train: bool = True):
        self.is_train = is_train
        self.augmentations = T.AugmentationList(utils.build_augmentation(cfg, is_train))
        self.image_format = cfg.INPUT.FORMAT

    def __call__(self, dataset_dict: dict) -> dict:
        d = copy.deepcopy(dataset_dict)
        image = utils.read_image(d["file_name"], format=self.image_format)
        utils.check_image_size(d, image)
        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        h, w = image.shape[:2]
        d["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if not self.is_train:
            d.pop("annotations", None)
            return d
        annos = []
        for obj in d.pop("annotations", []):
            if obj.get("iscrowd", 0) != 0:
                continue
            obj = {k: v for k, v in obj.items() if k in ("bbox", "bbox_mode", "category_id")}
            annos.append(utils.transform_instance_annotations(obj, transforms, (h, w)))
        instances = utils.annotations_to_instances(annos, (h, w))
        d["instances"] = utils.filter_empty_instances(instances)
        return d
