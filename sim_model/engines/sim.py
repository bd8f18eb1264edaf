"""The SIM box→mask engine: a trained CondInst/BoxInst/SIM model version turns boxes into masks.

For each drawn box the engine builds the mask the way SIM builds its pseudo masks in training
(SIM, CVPR 2023, §3.2):

1. the locations that training would make positives of that box, their regressed boxes and their
   dynamic-head masks → instance map M_I, each mask weighted by exp(µ·IoU(pred box, box)) (Eq. 6);
2. the prototypes of the box's label scored against the mask features Z → semantic map M_S (Eq. 1);
3. rectification M̂_prob = (1 − α)·M_S + α·M_I (Eq. 7), resized to the image and set to 0 outside the box;
4. the score is S_k, the mean of M̂_prob where M̂_prob ≥ τ_high (Eq. 8, 11).

A label that the model has never seen (absent from ``classes.json``, or a class whose prototypes were
never updated, or a model trained without SIM) uses M_I alone. The network runs once per image
(:meth:`CondInst.image_features`); each further box costs one dynamic mask head on the mask grid. The
features of the last few images are kept (keyed by the image's content), so a box drawn later on the
same image — the interactive Label Studio case, one /predict per new box — skips the network pass.

The hyperparameters come from the version's ``config.yaml``: ``MODEL.SIM.INSTANCE_MAP_MU`` (µ),
``MODEL.SIM.RECTIFY_ALPHA`` (α), ``MODEL.SIM.PROTOTYPES.TEMPERATURE`` (τ),
``MODEL.SIM.THRESH_LOW`` / ``MODEL.SIM.THRESH_HIGH`` (τ_low / τ_high), and the test-time resize
``INPUT.MIN_SIZE_TEST`` / ``INPUT.MAX_SIZE_TEST``; the constructor's keyword arguments override them.
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from sim_model.box_to_mask import BoxToMask, sim_model_version
from sim_model.sim.copy_paste import box_masks
from sim_model.sim.pseudo_masks import instance_map, mask_score, positive_weights, rectify, threshold_pseudo_mask

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.pth"
CLASSES_FILE = "classes.json"


class ModelVersionError(RuntimeError):
    """A model version directory cannot be loaded (missing, unreadable or inconsistent file)."""


def _read_classes(path: Path) -> list[str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelVersionError(f"{path}: cannot read the class list ({e.__class__.__name__}: {e})") from e
    labels = data.get("labels") if isinstance(data, dict) else None
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise ModelVersionError(f'{path}: expected {{"labels": ["name", ...]}}, got {str(data)[:200]}')
    if len(set(labels)) != len(labels):
        raise ModelVersionError(f"{path}: duplicate labels in {labels}")
    return labels


class SIMBoxToMask(BoxToMask):
    """Box→mask with a trained SIM model (see the module docstring).

    Args:
        model: a ``CondInst`` (``sim_model.modeling.condinst``) with weights loaded; put in eval mode.
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
        from detectron2.data import transforms as T

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
    def from_version_dir(cls, path: str | Path, device: str = "cpu", **overrides) -> "SIMBoxToMask":
        """Load a model version written by training (layout in ``training/registry.py``).

        Args:
            path: ``<model dir>/<project>/<version>/`` with ``config.yaml`` (detectron2 config dump),
                ``model.pth`` (detectron2 checkpoint) and ``classes.json`` (``{"labels": [...]}``).
            device: torch device for the model ("cpu", "cuda", …).
            **overrides: keyword arguments of the constructor (``mu``, ``alpha``, …).

        Returns:
            the engine; ``model_version`` is ``"sim-<directory name>"``.

        Raises:
            ModelVersionError: a file is missing, unreadable, or does not match the model it describes.
        """
        from detectron2.checkpoint import DetectionCheckpointer
        from detectron2.modeling import build_model

        from sim_model.config import get_sim_cfg
        import sim_model.modeling  # noqa: F401  (registers CondInst and the backbones)

        vdir = Path(path)
        if not vdir.is_dir():
            raise ModelVersionError(f"model version directory {vdir} does not exist")
        missing = [f for f in (CONFIG_FILE, WEIGHTS_FILE, CLASSES_FILE) if not (vdir / f).is_file()]
        if missing:
            raise ModelVersionError(f"model version {vdir} lacks {', '.join(missing)}")
        labels = _read_classes(vdir / CLASSES_FILE)

        cfg = get_sim_cfg()
        try:
            cfg.merge_from_file(str(vdir / CONFIG_FILE))
        except Exception as e:  # yaml errors, unknown keys, wrong types
            raise ModelVersionError(f"{vdir / CONFIG_FILE}: not a valid SIM config "
                                    f"({e.__class__.__name__}: {e})") from e
        cfg.MODEL.DEVICE = str(device)
        cfg.MODEL.WEIGHTS = ""
        if "EFFICIENTNET_LITE" in cfg.MODEL:
            cfg.MODEL.EFFICIENTNET_LITE.PRETRAINED = False  # every weight comes from model.pth
        cfg.freeze()
        try:
            model = build_model(cfg)
        except Exception as e:
            raise ModelVersionError(f"{vdir / CONFIG_FILE}: cannot build the model ({e.__class__.__name__}: {e})") from e

        checkpointer = DetectionCheckpointer(model)
        weights = str(vdir / WEIGHTS_FILE)
        try:
            checkpoint = checkpointer._load_file(weights)
            incompatible = checkpointer._load_model(checkpoint)
        except Exception as e:  # truncated / not a torch file / wrong shapes
            raise ModelVersionError(f"{weights}: cannot load the checkpoint ({e.__class__.__name__}: {e})") from e
        missing_keys = [k for k in incompatible.missing_keys if k.startswith("net.")]
        if missing_keys:
            raise ModelVersionError(f"{weights} does not hold this model's weights: {len(missing_keys)} missing, "
                                    f"e.g. {missing_keys[:3]}")
        shape_errors = getattr(incompatible, "incorrect_shapes", [])
        if shape_errors:
            raise ModelVersionError(f"{weights}: weights of the wrong shape for {vdir / CONFIG_FILE}: "
                                    f"{shape_errors[:3]}")
        return cls(model, cfg, labels, sim_model_version(vdir.name), **overrides)

    # ------------------------------------------------------------------ prediction
    @torch.no_grad()
    def image_features(self, image: np.ndarray):
        """The network pass on one image at the test resolution, cached by image content.

        Args:
            image: (H, W, 3) uint8 RGB.

        Returns:
            (transform, features): the detectron2 resize transform applied to the image (maps boxes
            with ``apply_box``) and the model's :class:`~sim_model.modeling.condinst.ImageFeatures`.
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
        feats = self.model.image_features(tensor)
        if key is not None:
            with self._cache_lock:
                self._cache[key] = (tf, feats)
                while len(self._cache) > self.feature_cache_size:
                    self._cache.popitem(last=False)
        return tf, feats

    def _class_ids(self, labels: Sequence[str]) -> torch.Tensor:
        """(N,) long class ids; -1 for a label the model does not know."""
        return torch.tensor([self.class_ids.get(str(name), -1) for name in labels], dtype=torch.long)

    @torch.no_grad()
    def predict(self, image: np.ndarray, boxes: np.ndarray, labels: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Segment the object in each box (see :meth:`BoxToMask.predict` and the module docstring).

        Args:
            image: (H, W, 3) uint8 RGB.
            boxes: (N, 4) float XYXY in pixels.
            labels: N class names; unknown names fall back to M_I alone.

        Returns:
            masks: (N, H, W) float32 M̂_prob in [0, 1], zero outside each box.
            scores: (N,) float32 S_k (SIM Eq. 11) in [0, 1].

        Raises:
            BoxToMaskError: malformed image, boxes or labels.
        """
        boxes = self._check_inputs(image, boxes, labels)
        h0, w0 = image.shape[:2]
        n = boxes.shape[0]
        if n == 0:
            return np.zeros((0, h0, w0), np.float32), np.zeros((0,), np.float32)

        tf, feats = self.image_features(image)
        rboxes = torch.as_tensor(tf.apply_box(boxes.astype(np.float32)), dtype=torch.float32)

        # M_I per box (Eq. 6) on the mask grid
        m_i = []
        for b in rboxes:
            pred_boxes, logits = self.model.positive_masks(feats, b)
            w = positive_weights(pred_boxes.float(), b.to(pred_boxes.device), self.mu)
            m_i.append(instance_map(logits.float().sigmoid(), w))
        m_i = torch.stack(m_i)  # (N, Hm, Wm)

        # M_S per box from the prototypes of its label (Eq. 1); unknown labels: none
        ids = self._class_ids(labels)
        m_s = torch.zeros_like(m_i)
        valid = torch.zeros(n, dtype=torch.bool, device=m_i.device)
        prototypes = getattr(self.model, "prototypes", None)
        known = torch.nonzero(ids >= 0).squeeze(1)
        if prototypes is not None and known.numel():
            z = F.normalize(feats.mask_features.float(), dim=0)
            ms_k, valid_k = prototypes.semantic_map(z, ids[known].to(z.device), self.tau)
            m_s[known.to(m_s.device)] = ms_k.to(m_s.dtype)
            valid[known.to(valid.device)] = valid_k.to(valid.device)
        m_prob = rectify(m_s, m_i, self.alpha, valid)  # (Eq. 7)

        # to image pixels, restricted to the box; S_k (Eq. 8, 11)
        full = feats.to_image(m_prob, (h0, w0)).clamp_(0.0, 1.0)
        full = full * box_masks(torch.as_tensor(boxes), h0, w0).to(full.device, full.dtype)
        target, _ = threshold_pseudo_mask(full, self.tau_low, self.tau_high)
        scores = mask_score(full, target)
        return full.cpu().numpy().astype(np.float32), scores.cpu().numpy().astype(np.float32)
