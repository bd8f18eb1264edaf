"""The SIM box→mask engine: a trained CondInst/BoxInst/SIM model version turns boxes into masks.

For each drawn box the engine builds the mask exactly the way SIM builds its pseudo masks in training,
with the same function (:func:`sim_model.sim.pseudo_masks.sim_pseudo_masks`, SIM §3.2):

1. the locations that training would make positives of that box, their regressed boxes and their
   dynamic-head masks → instance map M_I, each mask weighted by exp(µ·IoU(pred box, box)) (Eq. 6);
2. the prototypes of the box's label scored against the mask features Z → semantic map M_S (Eq. 1);
3. rectification M̂_prob = (1 − α)·M_S + α·M_I (Eq. 7), resampled to the image's pixels inside the box
   (the box-local mask of :class:`sim_model.box_to_mask.BoxMasks`);
4. the score is S_k, the mean of M̂_prob where M̂_prob ≥ τ_high (Eq. 8, 11).

Where the network looks:

- **close look** (``INPUT.BOX_CROP.ENABLED``, the model trained on box-centred crops): the network runs
  on the window around each box (:func:`sim_model.boxes.context_window` with
  ``INPUT.BOX_CROP.CONTEXT_TEST``) resized to ``INPUT.BOX_CROP.MIN_SIZE_TEST`` — every box gets about
  the same number of mask cells, whatever its size in the image;
- otherwise the whole image at ``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``: one network pass per image,
  each further box costs one dynamic mask head.

The network's outputs of the last few views (keyed by their content) are kept, so a box asked again —
or, without the close look, any box drawn later on the same image — skips the network pass.

Colour steps on top of the map (S_k stays the map's):

- **refinement** (``refine``, ``TEST.REFINE.*``): M̂_prob seeds GrabCut inside the box
  (:meth:`sim_model.engines.grabcut.GrabCutBoxToMask.refine`); the colour model sharpens the learned
  prior. A degenerate GrabCut keeps M̂_prob.
- **vote** (``vote``, ``TEST.VOTE.*``): the mask is w·M̂_prob + (1 − w)·mean(G), G the masks of GrabCut
  from the rectangle (the cold start, :func:`sim_model.engines.cold_start_engine`) and, with ``refine``,
  the refined mask; w = ``TEST.VOTE.MAP_WEIGHT``. Where the map and GrabCut disagree, the more certain
  one wins: the learned prior corrects GrabCut where it is sure, and GrabCut keeps the boundary where
  the map hesitates. GrabCut runs in a worker thread of the call while the network looks at the box
  (OpenCV and torch both release the GIL), so on two cores the vote costs about the slower of the two, not
  their sum. When the refinement degenerates (:meth:`~sim_model.engines.grabcut.GrabCutBoxToMask.refine`
  returns None), the map stands in for the refined mask in the vote (its weight is then w + (1 − w)/2).

A label that the model has never seen (absent from ``classes.json``, or a class whose prototypes were
never updated, or a model trained without SIM) uses M_I alone.

The hyperparameters come from the version's ``config.yaml``: ``MODEL.SIM.INSTANCE_MAP_MU`` (µ),
``MODEL.SIM.RECTIFY_ALPHA`` (α), ``MODEL.SIM.PROTOTYPES.TEMPERATURE`` (τ),
``MODEL.SIM.THRESH_LOW`` / ``MODEL.SIM.THRESH_HIGH`` (τ_low / τ_high), the resize keys above and
``TEST.REFINE.*``, ``TEST.VOTE.*``; the constructor's keyword arguments override them.
"""
from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.data import transforms as T

from sim_model.box_to_mask import BoxToMask
from sim_model.boxes import box_pixel_bounds, context_window
from sim_model.checkpoint import load_version_model
from sim_model.engines import cold_start_engine
from sim_model.engines.grabcut import GrabCutBoxToMask
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
        close_look: override ``INPUT.BOX_CROP.ENABLED`` (run the network on a window around each box).
        refine: override ``TEST.REFINE.ENABLED`` (GrabCut seeded from the map).
        vote: override ``TEST.VOTE.ENABLED`` (the map votes with GrabCut).
        map_weight: override ``TEST.VOTE.MAP_WEIGHT`` (the map's weight in the vote, in [0, 1]).
        feature_cache_size: how many views' network outputs to keep for later boxes (0 = none).

    Raises:
        ModelVersionError: more class names than the model has classes.
        ValueError: a map weight outside [0, 1].
    """

    def __init__(self, model, cfg, class_names: Sequence[str], model_version: str, *, mu: float | None = None,
                 alpha: float | None = None, tau: float | None = None, tau_low: float | None = None,
                 tau_high: float | None = None, close_look: bool | None = None, refine: bool | None = None,
                 vote: bool | None = None, map_weight: float | None = None, feature_cache_size: int = 4):
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
        bc = cfg.INPUT.BOX_CROP
        self.close_look = bool(bc.ENABLED if close_look is None else close_look)
        self.context = float(bc.CONTEXT_TEST)
        self.crop_resize = T.ResizeShortestEdge([bc.MIN_SIZE_TEST, bc.MIN_SIZE_TEST], bc.MAX_SIZE_TEST)
        r = cfg.TEST.REFINE
        self.refine = bool(r.ENABLED if refine is None else refine)
        self.refine_low, self.refine_high = float(r.THRESH_LOW), float(r.THRESH_HIGH)
        self.refiner = GrabCutBoxToMask(iterations=int(r.ITERATIONS), short_side=int(r.SHORT_SIDE))
        v = cfg.TEST.VOTE
        self.vote = bool(v.ENABLED if vote is None else vote)
        self.map_weight = float(v.MAP_WEIGHT if map_weight is None else map_weight)
        if not 0.0 <= self.map_weight <= 1.0:
            raise ValueError(f"the map's weight in the vote must be in [0, 1], got {self.map_weight}")
        self.voter = cold_start_engine()
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
    def image_features(self, view: np.ndarray, close: bool = False) -> tuple[T.Transform, ImageFeatures]:
        """The network pass on one view (an image, or the window of a close look), cached by content.

        Args:
            view: (h, w, 3) uint8 RGB.
            close: resize as a close look (``INPUT.BOX_CROP.MIN/MAX_SIZE_TEST``) instead of a whole image
                (``INPUT.MIN/MAX_SIZE_TEST``).

        Returns:
            (transform, features): the detectron2 resize transform applied to the view (maps boxes with
            ``apply_box``) and the model's :class:`~sim_model.modeling.box_queries.ImageFeatures`.
        """
        return self._view(view, close)[:2]

    def _view(self, view: np.ndarray, close: bool) -> tuple[T.Transform, ImageFeatures, torch.Tensor]:
        """:meth:`image_features` plus Z L2-normalised along its channels ((D, Hm, Wm) float)."""
        key = None
        if self.feature_cache_size:
            view = np.ascontiguousarray(view)
            key = (close, view.shape, hashlib.blake2b(view.data, digest_size=16).hexdigest())
            with self._cache_lock:
                hit = self._cache.get(key)
                if hit is not None:
                    self._cache.move_to_end(key)
                    return hit
        tf = (self.crop_resize if close else self.resize).get_transform(view)
        resized = tf.apply_image(view)
        if self.input_format == "BGR":
            resized = resized[:, :, ::-1]
        tensor = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)).astype(np.float32))
        feats = image_features(self.model, tensor)
        entry = (tf, feats, F.normalize(feats.mask_features.float(), dim=0))
        if key is not None:
            with self._cache_lock:
                self._cache[key] = entry
                while len(self._cache) > self.feature_cache_size:
                    self._cache.popitem(last=False)
        return entry

    @torch.no_grad()
    def _predict(self, image: np.ndarray, boxes: np.ndarray, labels: list[str]) -> tuple[list[np.ndarray], np.ndarray]:
        """M̂_prob of each box over its pixel bounds (after the colour steps ``refine`` / ``vote``) and S_k
        (module docstring).

        Returns:
            crops: N float32 masks in [0, 1] over each box's pixel bounds; scores: (N,) float32 S_k.
        """
        hw = image.shape[:2]
        prototypes = getattr(self.model, "prototypes", None)
        crops, scores = [], np.zeros(len(boxes), np.float32)
        # the vote's GrabCut masks are computed alongside the network, in a worker thread of this call (a
        # request never waits behind another request's boxes)
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vote-grabcut") if self.vote else None
        pending: list[Future] = [pool.submit(self.voter.segment_box, image, box) for box in boxes] if pool else []
        try:
            whole = None if self.close_look else self._view(image, False)  # one pass serves every box
            for k, box in enumerate(boxes):
                c0, r0, c1, r1 = box_pixel_bounds(box, hw)
                if whole is None:
                    x0, y0, x1, y1 = context_window(box, hw, self.context)
                    tf, feats, z = self._view(image[y0:y1, x0:x1], True)
                else:
                    (x0, y0, x1, y1), (tf, feats, z) = (0, 0, hw[1], hw[0]), whole
                local_box = (np.asarray(box, np.float32) - np.array([x0, y0, x0, y0], np.float32))[None]
                rbox = torch.as_tensor(tf.apply_box(local_box)[0], dtype=torch.float32)
                pred_boxes, logits = positive_masks(feats, rbox)
                class_id = torch.tensor([self.class_ids.get(labels[k], -1)], dtype=torch.long)
                window = (c0 - x0, r0 - y0, c1 - x0, r1 - y0)
                pm = sim_pseudo_masks(
                    logits.float().sigmoid(), pred_boxes.float(), torch.zeros(len(logits), dtype=torch.long),
                    rbox[None].to(pred_boxes.device), z, class_id, prototypes, mu=self.mu, alpha=self.alpha,
                    tau=self.tau, tau_low=self.tau_low, tau_high=self.tau_high,
                    resample=lambda m, b=window, v=(y1 - y0, x1 - x0): feats.to_image_window(m, v, b).clamp_(0.0, 1.0))
                prob = pm.prob[0].cpu().numpy().astype(np.float32)
                crops.append(self._colour_steps(image, box, prob, pending[k].result()[0] if pending else None))
                scores[k] = float(pm.score[0])
        finally:
            for f in pending:  # a failed box stops the queued GrabCut runs
                f.cancel()
            if pool is not None:
                pool.shutdown(wait=False)
        return crops, scores

    def _colour_steps(self, image: np.ndarray, box: np.ndarray, prob: np.ndarray,
                      grabcut: np.ndarray | None = None) -> np.ndarray:
        """The refinement and the vote (module docstring) on one box's map.

        Args:
            image: (H, W, 3) uint8 RGB; box: (4,) float XYXY in pixels, clipped to the image.
            prob: (r1 - r0, c1 - c0) float32 M̂_prob in [0, 1] over the box's pixel bounds.
            grabcut: the cold start's mask of that box when already computed (the vote), else None.

        Returns:
            the served (r1 - r0, c1 - c0) float32 mask in [0, 1].
        """
        out = prob
        voters = []
        if self.refine:
            refined = self.refiner.refine(image, box, prob, self.refine_low, self.refine_high)
            out = prob if refined is None else refined
            voters.append(out)
        if self.vote:
            voters.append(self.voter.segment_box(image, box)[0] if grabcut is None else grabcut)
            out = self.map_weight * prob + (1.0 - self.map_weight) * np.mean(voters, axis=0)
        return out.astype(np.float32)


__all__ = ["SIMBoxToMask"]
