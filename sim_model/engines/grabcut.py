"""Cold-start box→mask engine: OpenCV GrabCut initialised from each box, made robust.

Per box:

1. crop the image around the box with a margin (``margin`` × box size on each side, at least
   ``min_margin_px``), so the background model is learnt from the object's surroundings only;
2. rescale the crop so that the box's short side is ``short_side`` pixels (upscales small boxes,
   downscales big ones; the crop's long side is capped at ``max_side``), so GrabCut's pairwise term
   and its cost no longer depend on the object's size;
3. run ``iterations`` of ``cv2.grabCut`` with ``GC_INIT_WITH_MASK``: outside the box = background
   (``GC_BGD``), so nothing outside the box can become foreground; ``init="rect"`` (default) makes the
   whole box probable foreground (the classic rectangle initialisation); ``init="mask"`` makes the box
   probable background except the inscribed ellipse scaled by ``prior_scale`` (probable foreground);
   ``core_scale`` > 0 marks a central ellipse as certain foreground;
4. optionally smooth the label map (a Gaussian of ``smooth_sigma`` working-scale pixels) and resize it
   back bilinearly: the mask is soft (probabilities in [0, 1]) along the boundary; ``prior_weight`` > 0
   blends it with the inscribed ellipse;
5. fall back to the inscribed ellipse (the best image-free shape prior) when GrabCut degenerates, i.e.
   its foreground covers under ``min_fill`` of the box.

The defaults are the fastest setting of the options sweep in docs/benchmarks.md ("GrabCut options").

:meth:`GrabCutBoxToMask.refine` runs the same GrabCut initialised from a learned probability map inside
the box instead of the rectangle (the SIM engine's refinement, ``TEST.REFINE.*``): certain foreground
where the map is at or above ``thresh_high``, probable foreground from 0.5, probable background from
``thresh_low``, certain background below it and outside the box.

Score (mask confidence in [0, 1]): BoxInst's tightness prior — the mask of an object in a tight box
touches all four sides, so its projections onto x and y span the box. The score is the fraction of the
box's columns that the mask covers times the fraction of its rows, multiplied by
``fallback_score_factor`` when the ellipse fallback was used.
"""
from __future__ import annotations


import cv2
import numpy as np

from sim_model.box_to_mask import BoxToMask
from sim_model.boxes import box_pixel_bounds
from sim_model.engines.shape_prior import ellipse_mask


class GrabCutBoxToMask(BoxToMask):
    """GrabCut from each box on a rescaled crop, clipped to the box, with an ellipse fallback.

    Args:
        margin: crop margin on each side as a fraction of the box width (left/right) and height
            (top/bottom).
        min_margin_px: smallest crop margin in original-image pixels.
        short_side: the box's short side is rescaled to this many pixels (up or down).
        max_side: cap on the rescaled crop's long side in pixels (elongated boxes).
        iterations: ``cv2.grabCut`` iterations.
        init: "rect" (the whole box probable foreground) or "mask" (the ellipse of ``prior_scale``
            probable foreground, the rest of the box probable background).
        prior_scale: semi-axes of that ellipse as a fraction of the inscribed ellipse's (``init="mask"``).
        core_scale: > 0 marks the inscribed ellipse scaled by this as certain foreground (``GC_FGD``).
        smooth_sigma: Gaussian sigma in working-scale pixels applied to the foreground map before it is
            resized back (0 = none).
        prior_weight: weight of the inscribed ellipse blended into the GrabCut mask (0 = none).
        min_fill: GrabCut foreground under this fraction of the box area → ellipse fallback.
        fallback_score_factor: the score of an ellipse fallback is multiplied by this.
        mask_threshold: probability at or above which a pixel counts as foreground (fallback test, score).
        seed: OpenCV RNG seed set before each ``cv2.grabCut`` (its GMM k-means initialisation is random),
            so that a box always gets the same mask; this reseeds the calling thread's ``cv2.theRNG()``.

    Raises:
        ValueError: an unknown ``init``, ``iterations`` < 1, ``short_side`` < 8 or ``max_side`` < ``short_side``.
    """

    model_version = "grabcut-v1"

    def __init__(self, *, margin: float = 0.15, min_margin_px: int = 4, short_side: int = 96,
                 max_side: int = 320, iterations: int = 1, init: str = "rect", prior_scale: float = 1.0,
                 smooth_sigma: float = 0.0, min_fill: float = 0.25, fallback_score_factor: float = 0.5,
                 mask_threshold: float = 0.5, prior_weight: float = 0.0, core_scale: float = 0.0,
                 seed: int = 0):
        if init not in ("mask", "rect"):
            raise ValueError(f"init must be 'mask' or 'rect', got {init!r}")
        if iterations < 1 or short_side < 8 or max_side < short_side:
            raise ValueError("need iterations >= 1, short_side >= 8 and max_side >= short_side")
        self.short_side = int(short_side)
        self.margin = float(margin)
        self.min_margin_px = int(min_margin_px)
        self.max_side = int(max_side)
        self.iterations = int(iterations)
        self.init = init
        self.prior_scale = float(prior_scale)
        self.smooth_sigma = float(smooth_sigma)
        self.min_fill = float(min_fill)
        self.fallback_score_factor = float(fallback_score_factor)
        self.mask_threshold = float(mask_threshold)
        self.prior_weight = float(prior_weight)
        self.core_scale = float(core_scale)
        self.seed = int(seed)

    def _predict(self, image: np.ndarray, boxes: np.ndarray, labels: list[str]) -> tuple[list[np.ndarray], np.ndarray]:
        """GrabCut on each box (see :meth:`BoxToMask.predict`).

        Returns:
            crops: N float32 foreground probabilities in [0, 1] over each box's pixel bounds;
            scores: (N,) float32 mask confidences in [0, 1] (see the module docstring).
        """
        crops, scores = [], np.zeros(len(boxes), np.float32)
        for k, box in enumerate(boxes):
            crop, scores[k] = self.segment_box(image, box)
            crops.append(crop)
        return crops, scores

    # -- one box ---------------------------------------------------------------------------------------
    def segment_box(self, image: np.ndarray, box: np.ndarray) -> tuple[np.ndarray, float]:
        """Segment one box.

        Args:
            image: (H, W, 3) uint8 RGB.
            box: (4,) float XYXY in pixels, already clipped to the image.

        Returns:
            (r1 - r0, c1 - c0) float32 mask in [0, 1] over the box's pixel bounds
            (:func:`sim_model.boxes.box_pixel_bounds`); the score in [0, 1].
        """
        ell = ellipse_mask(image.shape[:2], box).astype(np.float32)
        prob = self._grabcut_crop(image, box)
        fallback = prob is None or (prob >= self.mask_threshold).sum() < self.min_fill * prob.size
        if fallback:
            prob = ell
        elif self.prior_weight > 0:
            prob = (1 - self.prior_weight) * prob + self.prior_weight * ell
        fg = prob >= self.mask_threshold
        if not fg.any():  # possible only with prior_weight > 0.5
            prob, fg, fallback = ell, ell >= self.mask_threshold, True
        score = float(fg.any(axis=0).mean() * fg.any(axis=1).mean())
        if fallback:
            score *= self.fallback_score_factor
        return prob.astype(np.float32), score

    def refine(self, image: np.ndarray, box: np.ndarray, prior: np.ndarray, thresh_low: float,
               thresh_high: float) -> np.ndarray | None:
        """GrabCut initialised from a probability map over the box (module docstring).

        Args:
            image: (H, W, 3) uint8 RGB.
            box: (4,) float XYXY in pixels, clipped to the image.
            prior: (r1 - r0, c1 - c0) float probabilities in [0, 1] over the box's pixel bounds
                (:func:`box_pixel_bounds`), e.g. the SIM map M̂_prob.
            thresh_low, thresh_high: below ``thresh_low`` certain background, at or above ``thresh_high``
                certain foreground (``TEST.REFINE.THRESH_LOW`` / ``THRESH_HIGH``).

        Returns:
            the refined (r1 - r0, c1 - c0) float32 mask in [0, 1], or None when GrabCut degenerates (no
            foreground seed, a single-colour crop, or foreground under ``min_fill`` of the prior's):
            then keep the prior.

        Raises:
            ValueError: ``prior`` does not match the box's pixel bounds, or thresh_low > 0.5 > thresh_high.
        """
        c0, r0, c1, r1 = box_pixel_bounds(box, image.shape[:2])
        if prior.shape != (r1 - r0, c1 - c0):
            raise ValueError(f"prior is {prior.shape}, the box covers {(r1 - r0, c1 - c0)} pixels")
        if not thresh_low <= 0.5 <= thresh_high:
            raise ValueError(f"need thresh_low <= 0.5 <= thresh_high, got {thresh_low}, {thresh_high}")
        out = self._grabcut_crop(image, box, prior=(np.asarray(prior, np.float32), thresh_low, thresh_high))
        if out is None:
            return None
        prior_fg = int((prior >= self.mask_threshold).sum())
        if (out >= self.mask_threshold).sum() < self.min_fill * max(prior_fg, 1):
            return None
        return out.astype(np.float32)

    def _grabcut_crop(self, image: np.ndarray, box: np.ndarray,
                      prior: tuple[np.ndarray, float, float] | None = None) -> np.ndarray | None:
        """GrabCut on the rescaled crop around ``box``, initialised from the rectangle (``init``) or from
        ``prior`` = (map over the box's pixel bounds, thresh_low, thresh_high).

        Returns:
            (r1 - r0, c1 - c0) float32 foreground probabilities over the box's pixel bounds
            (:func:`box_pixel_bounds`), or None when GrabCut fails.
        """
        h, w = image.shape[:2]
        x0, y0, x1, y1 = (float(v) for v in box)
        bw, bh = max(x1 - x0, 1.0), max(y1 - y0, 1.0)
        mx = max(self.margin * bw, self.min_margin_px)
        my = max(self.margin * bh, self.min_margin_px)
        cx0, cy0 = int(max(np.floor(x0 - mx), 0)), int(max(np.floor(y0 - my), 0))
        cx1, cy1 = int(min(np.ceil(x1 + mx), w)), int(min(np.ceil(y1 + my), h))
        # only the crop is copied, in OpenCV's channel order (memory grows with the box, not the image)
        crop = np.ascontiguousarray(image[cy0:cy1, cx0:cx1, ::-1])
        s = self.short_side / min(bw, bh)
        s = min(s, self.max_side / max(cx1 - cx0, cy1 - cy0))
        sw, sh = max(int(round((cx1 - cx0) * s)), 1), max(int(round((cy1 - cy0) * s)), 1)
        sx, sy = sw / (cx1 - cx0), sh / (cy1 - cy0)
        interp = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
        work = cv2.resize(crop, (sw, sh), interpolation=interp)
        # box in working coordinates (pixel-covering, like box_pixel_bounds)
        bx = (x0 - cx0) * sx, (y0 - cy0) * sy, (x1 - cx0) * sx, (y1 - cy0) * sy
        wb = box_pixel_bounds(np.array(bx), (sh, sw))
        gc = np.full((sh, sw), cv2.GC_BGD, np.uint8)
        in_box = gc[wb[1]:wb[3], wb[0]:wb[2]]  # a view: writes go to gc
        if prior is not None:
            p, lo, hi = prior
            p = cv2.resize(p, (wb[2] - wb[0], wb[3] - wb[1]), interpolation=cv2.INTER_LINEAR)
            in_box[:] = np.where(p >= hi, cv2.GC_FGD, np.where(p >= 0.5, cv2.GC_PR_FGD, np.where(
                p >= lo, cv2.GC_PR_BGD, cv2.GC_BGD))).astype(np.uint8)
        elif self.init == "rect":
            in_box[:] = cv2.GC_PR_FGD
            if self.core_scale > 0:
                in_box[ellipse_mask((sh, sw), np.array(bx), self.core_scale)] = cv2.GC_FGD
        else:
            in_box[:] = cv2.GC_PR_BGD
            in_box[ellipse_mask((sh, sw), np.array(bx), self.prior_scale)] = cv2.GC_PR_FGD
        fgmask = (gc == cv2.GC_PR_FGD) | (gc == cv2.GC_FGD)
        if not fgmask.any() or fgmask.all():
            return None
        flat = work.reshape(-1, 3)
        if (flat.min(axis=0) == flat.max(axis=0)).all():
            return None  # a single-colour crop carries no information (and stalls cv2.grabCut for ~30 s)
        bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
        cv2.setRNGSeed(self.seed)  # GrabCut's k-means init draws from this thread's RNG: same input, same mask
        try:
            cv2.grabCut(work, gc, None, bgd, fgd, self.iterations, cv2.GC_INIT_WITH_MASK)
        except cv2.error:
            return None
        fg = ((gc == cv2.GC_FGD) | (gc == cv2.GC_PR_FGD)).astype(np.float32)
        if self.smooth_sigma > 0:
            fg = cv2.GaussianBlur(fg, (0, 0), self.smooth_sigma)
        back = cv2.resize(fg, (cx1 - cx0, cy1 - cy0), interpolation=cv2.INTER_LINEAR)
        c0, r0, c1, r1 = box_pixel_bounds(box, (h, w))
        return np.clip(back[r0 - cy0:r1 - cy0, c0 - cx0:c1 - cx0], 0.0, 1.0)


__all__ = ["GrabCutBoxToMask"]
