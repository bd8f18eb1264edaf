"""The SIM box→mask engine: a trained CondInst/BoxInst/SIM model version turns boxes into masks.

For each drawn box the engine builds the mask exactly the way SIM builds its pseudo masks in training,
with the same function (:func:`sim_model.sim.pseudo_masks.sim_pseudo_masks`, SIM §3.2):

1. the locations that training would make positives of that box, their regressed boxes and their
   dynamic-head masks → instance map M_I, each mask weighted by exp(µ·IoU(pred box, box)) (Eq. 6);
2. the prototypes of the box's label scored against the mask features Z → semantic map M_S (Eq. 1);
3. rectification M̂_prob = (1 − α)·M_S + α·M_I (Eq. 7), resampled to the image's pixels inside the box
   (the box-local mask of :class:`sim_model.box_to_mask.BoxMasks`);
4. the score is S_k, the mean of M̂_prob where M̂_prob ≥ τ_high (Eq. 8, 11).

A label that the model has never seen (absent from ``classes.json``, or a class whose prototypes were
never updated, or a model trained without SIM) uses M_I alone. The network runs once per image
(:func:`sim_model.modeling.box_queries.image_features`); each further box costs one dynamic mask head
on the mask grid. The features of the last few images are kept (keyed by the image's content), so a box
drawn later on the same image — the interactive Label Studio case, one /predict per new box — skips
the network pass.

The hyperparameters come from the version's ``config.yaml``: ``MODEL.SIM.INSTANCE_MAP_MU`` (µ),
``MODEL.SIM.RECTIFY_ALPHA`` (α), ``MODEL.SIM.PROTOTYPES.TEMPERATURE`` (τ),
``MODEL.SIM.THRESH_LOW`` / ``MODEL.SIM.THRESH_HIGH`` (τ_low / τ_high), and the test-time resize
``INPUT.MIN_SIZE_TEST`` / ``INPUT.MAX_SIZE_TEST``; the constructor's keyword arguments override them.
"""
from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.data import transforms as T

from sim_model.box_to_mask import BoxToMask
from sim_model.boxes import box_pixel_bounds
from sim_model.checkpoint import load_version_model
from sim_model.modeling.box_queries import ImageFeatures, image_features, positive_masks
from sim_model.registry import ModelVersionError, sim_model_version
from sim_model.sim.pseudo_masks import sim_pseudo_masks


class SIMBoxToMask(BoxToMask):
    """Box→mask with a trained SIM model (see the module docstring).

    Args:
        model: a ``CondInst`` (:mod:`sim_model.condinst`) with weights loaded; put in eval mode.
        cfg: its detectron2 config (with :func:`sim_model.config.add_sim_config` keys).
        class_names: class names, index = class id (``classes.json``).
        model_version: the string reported to Label Studio, e.g. ``"sim-v0003"``.
        mu, alpha, tau, tau_low, tau_high: override ``MODEL.SIM.INSTANCE_MAP_MU``, ``RECTIFY_ALPHA``,
            ``PROTOTYPES.TEMPERATURE``, ``THRESH_LOW``, ``THRESH_HIGH``.
        feature_cache_size: how many images' network outputs to keep for later boxes (0 = none).

    Raises:
        ModelVersionError: more class names than the model has classes.
    """

    def __init__(self, model, cfg, class_names: Sequence[str], model_version: str, *, mu: float | None = None,
                 alpha: float | None = None, tau: float | None = None, tau_low: float | None = None,
                 tau_high: float | None = None, feature_cache_size: int = 4):
        s = cfg.MODEL.SIM
        num_classes = cfg.MODEL.FCOS.NUM_CLASSES
        if len(class_names) > num_classes:
            raise ModelVersionError(f"{len(class_names)} class names but the model has {num_classes} classes")
        self.model = model.eval()
        self.cfg = cfg
        self.class_names = list(class_names)
        self.class_ids = {name: i for i, name in enumerate(self.class_names)}
        self.model_version = model_version
        self.mu = float(s.INSTANCE_MAP_MU if mu is None else mu)
        self.alpha = float(s.RECTIFY_ALPHA if alpha is None else alpha)
        self.tau = float(s.PROTOTYPES.TEMPERATURE if tau is None else tau)
        self.tau_low = float(s.THRESH_LOW if tau_low is None else tau_low)
        self.tau_high = float(s.THRESH_HIGH if tau_high is None else tau_high)
        self.input_format = cfg.INPUT.FORMAT
        self.resize = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST)
        self.feature_cache_size = max(0, int(feature_cache_size))
        self._cache: OrderedDict[tuple, tuple] = OrderedDict()
        self._cache_lock = threading.Lock()

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_version_dir(cls, path: str | os.PathLike, device: str = "cpu", **overrides) -> "SIMBoxToMask":
        """Load a model version (layout in :mod:`sim_model.registry`).

        Args:
            path: ``<model dir>/<project>/<version>/`` with ``config.yaml``, ``model.pth``, ``classes.json``.
            device: torch device for the model ("cpu", "cuda", …).
            **overrides: keyword arguments of the constructor (``mu``, ``alpha``, …).

        Returns:
            the engine; ``model_version`` is ``"sim-<directory name>"``.

        Raises:
            ModelVersionError: a file is missing, unreadable, or does not match the model it describes.
        """
        v = load_version_model(path, device)
        return cls(v.model, v.cfg, v.labels, sim_model_version(Path(path).name), **overrides)

    # ------------------------------------------------------------------ prediction
    @torch.no_grad()
    def image_features(self, image: np.ndarray) -> tuple[T.Transform, ImageFeatures]:
        """The network pass on one image at the test resolution, cached by image content.

        Args:
            image: (H, W, 3) uint8 RGB.

        Returns:
            (transform, features): the detectron2 resize transform applied to the image (maps boxes
            with ``apply_box``) and the model's :class:`~sim_model.modeling.box_queries.ImageFeatures`.
        """
        key = None
        if self.feature_cache_size:
            key = (image.shape, hashlib.blake2b(np.ascontiguousarray(image).data, digest_size=16).hexdigest())
            with self._cache_lock:
                hit = self._cache.get(key)
                if hit is not None:
                    self._cache.move_to_end(key)
                    return hit
        tf = self.resize.get_transform(image)
        resized = tf.apply_image(image)
        if self.input_format == "BGR":
            resized = resized[:, :, ::-1]
        tensor = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)).astype(np.float32))
        feats = image_features(self.model, tensor)
        if key is not None:
            with self._cache_lock:
                self._cache[key] = (tf, feats)
                while len(self._cache) > self.feature_cache_size:
                    self._cache.popitem(last=False)
        return tf, feats

    @torch.no_grad()
    def _predict(self, image: np.ndarray, boxes: np.ndarray, labels: list[str]) -> tuple[list[np.ndarray], np.ndarray]:
        """M̂_prob of each box over its pixel bounds and S_k (module docstring).

        Returns:
            crops: N float32 M̂_prob in [0, 1] over each box's pixel bounds; scores: (N,) float32 S_k.
        """
        hw = image.shape[:2]
        tf, feats = self.image_features(image)
        rboxes = torch.as_tensor(tf.apply_box(boxes.astype(np.float32)), dtype=torch.float32)
        z = F.normalize(feats.mask_features.float(), dim=0)
        prototypes = getattr(self.model, "prototypes", None)
        crops, scores = [], np.zeros(len(boxes), np.float32)
        for k, (box, rbox) in enumerate(zip(boxes, rboxes)):
            bounds = box_pixel_bounds(box, hw)
            pred_boxes, logits = positive_masks(feats, rbox)
            class_id = torch.tensor([self.class_ids.get(labels[k], -1)], dtype=torch.long)
            pm = sim_pseudo_masks(
                logits.float().sigmoid(), pred_boxes.float(), torch.zeros(len(logits), dtype=torch.long),
                rbox[None].to(pred_boxes.device), z, class_id, prototypes, mu=self.mu, alpha=self.alpha,
                tau=self.tau, tau_low=self.tau_low, tau_high=self.tau_high,
                resample=lambda m, b=bounds: feats.to_image_window(m, hw, b).clamp_(0.0, 1.0))
            crops.append(pm.prob[0].cpu().numpy().astype(np.float32))
            scores[k] = float(pm.score[0])
        return crops, scores


__all__ = ["SIMBoxToMask"]
