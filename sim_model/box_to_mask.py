"""The one box→mask interface that the backend, the benchmark, the evaluation and the retrain scores use.

An engine turns an RGB image and N boxes (XYXY, pixels) with their labels into N soft masks and N
quality scores. :meth:`BoxToMask.predict` guards every engine: it validates the inputs, calls the
engine's :meth:`BoxToMask._predict` with boxes already clipped to the image, and checks what comes
back, so no engine can forget either side.

A mask is zero outside its box by contract, so it is kept **box-local**: :class:`BoxMasks` holds
each mask over its box's pixel bounds (:func:`sim_model.boxes.box_pixel_bounds`) with that offset,
the way detectron2 keeps masks local to their box and pastes them late. Memory grows with the boxes'
area, not with boxes × image size; :meth:`BoxMasks.full` pastes one mask into the image when a
consumer needs it (brush RLE, COCO RLE).

:func:`predict_valid_boxes` is the check-boxes → predict → skip sequence shared by the backend, the
scores and the evaluation: boxes that cannot be segmented (zero area, outside the image, …) are
skipped with their reason and the rest go to the engine in one call, or, under a deadline, in chunks
that shrink as it nears (:func:`predict_valid_box_chunks`; the boxes not reached by then are skipped as
:data:`DEADLINE_EXCEEDED`).
"""
from __future__ import annotations

import abc
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from sim_model.boxes import box_pixel_bounds


#: The skip reason of a box that :func:`predict_valid_boxes` did not reach before its deadline.
DEADLINE_EXCEEDED = "deadline exceeded"


class BoxToMaskError(ValueError):
    """Input that no engine can turn into masks (bad image array, malformed boxes), or an engine's
    output that breaks the :class:`BoxMasks` contract."""


@dataclass(frozen=True)
class BoxCheck:
    """Result of :func:`check_boxes` for one box.

    Attributes:
        box: (4,) float32 XYXY in pixels, clipped to the image (meaningful only when ``ok``).
        ok: whether the box can be segmented.
        reason: empty when ``ok``; otherwise a human-readable reason ("zero area", "outside the image").
    """

    box: np.ndarray
    ok: bool
    reason: str = ""


def check_image(image: np.ndarray) -> None:
    """Validate an image array.

    Args:
        image: (H, W, 3) uint8 RGB.

    Raises:
        BoxToMaskError: if the array is not (H, W, 3) uint8 with H, W >= 1.
    """
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        raise BoxToMaskError(f"image must be an (H, W, 3) RGB array, got shape {getattr(image, 'shape', None)}")
    if image.dtype != np.uint8:
        raise BoxToMaskError(f"image must be uint8, got {image.dtype}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise BoxToMaskError(f"image is empty: {image.shape}")


def check_boxes(boxes: np.ndarray, image_hw: tuple[int, int], min_size: float = 1.0) -> list[BoxCheck]:
    """Clip boxes to the image and flag the ones that cannot be segmented.

    Args:
        boxes: (N, 4) float XYXY in pixels (x0, y0, x1, y1), x to the right, y down.
        image_hw: (H, W) of the image in pixels.
        min_size: smallest width and height in pixels, after clipping, of a usable box.

    Returns:
        One :class:`BoxCheck` per box, in order. A box is not ok when it has a non-finite coordinate,
        when x1 <= x0 or y1 <= y0 ("zero area"), when it lies entirely outside the image
        ("outside the image"), or when its clipped part is smaller than ``min_size`` pixels.

    Raises:
        BoxToMaskError: if ``boxes`` is not an (N, 4) array.
    """
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise BoxToMaskError(f"boxes must be an (N, 4) XYXY array, got shape {boxes.shape}")
    h, w = image_hw
    out = []
    for b in boxes:
        if not np.all(np.isfinite(b)):
            out.append(BoxCheck(b.astype(np.float32), False, "non-finite coordinate"))
            continue
        x0, y0, x1, y1 = b
        if x1 <= x0 or y1 <= y0:
            out.append(BoxCheck(b.astype(np.float32), False, f"zero area box {b.round(2).tolist()}"))
            continue
        c = np.array([np.clip(x0, 0, w), np.clip(y0, 0, h), np.clip(x1, 0, w), np.clip(y1, 0, h)])
        if c[2] - c[0] <= 0 or c[3] - c[1] <= 0:
            out.append(BoxCheck(c.astype(np.float32), False,
                                f"box {b.round(2).tolist()} is outside the {w}x{h} image"))
            continue
        if c[2] - c[0] < min_size or c[3] - c[1] < min_size:
            out.append(BoxCheck(c.astype(np.float32), False,
                                f"box {b.round(2).tolist()} is smaller than {min_size} px inside the image"))
            continue
        out.append(BoxCheck(c.astype(np.float32), True))
    return out


@dataclass(frozen=True)
class BoxMasks:
    """N soft masks, each kept over its box's pixel bounds (zero outside them by contract).

    Attributes:
        image_size: (H, W) of the image in pixels.
        bounds: (N, 4) int64 (c0, r0, c1, r1) half-open pixel bounds of each box
            (:func:`sim_model.boxes.box_pixel_bounds`).
        crops: N float32 arrays, crop k of shape (r1 - r0, c1 - c0): mask probabilities in [0, 1].
        scores: (N,) float32 mask-quality scores in [0, 1] (SIM Eq. 11's S_k for SIM).
    """

    image_size: tuple[int, int]
    bounds: np.ndarray
    crops: tuple[np.ndarray, ...]
    scores: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.float32))

    def __len__(self) -> int:
        return len(self.crops)

    @classmethod
    def empty(cls, image_size: tuple[int, int]) -> "BoxMasks":
        """No mask on an image of ``image_size`` (H, W)."""
        return cls(tuple(int(v) for v in image_size), np.zeros((0, 4), np.int64), (), np.zeros((0,), np.float32))

    def full(self, k: int, dtype=np.float32) -> np.ndarray:
        """Mask ``k`` pasted into a zero (H, W) image of ``dtype`` (one image-sized array: use sparingly)."""
        c0, r0, c1, r1 = (int(v) for v in self.bounds[k])
        out = np.zeros(self.image_size, dtype)
        out[r0:r1, c0:c1] = self.crops[k]
        return out

    def dense(self) -> np.ndarray:
        """All masks as one (N, H, W) float32 array (small images only: N × H × W floats)."""
        out = np.zeros((len(self),) + tuple(self.image_size), np.float32)
        for k, (c0, r0, c1, r1) in enumerate(self.bounds.tolist()):
            out[k, r0:r1, c0:c1] = self.crops[k]
        return out

    def foreground(self, k: int, threshold: float) -> np.ndarray:
        """Crop ``k`` thresholded: (r1 - r0, c1 - c0) bool, True where the probability >= ``threshold``."""
        return self.crops[k] >= threshold

    @classmethod
    def concat(cls, image_size: tuple[int, int], parts: Sequence["BoxMasks"]) -> "BoxMasks":
        """The masks of ``parts`` (all on one image of ``image_size`` (H, W)), one after another."""
        if not parts:
            return cls.empty(image_size)
        return cls(tuple(int(v) for v in image_size), np.concatenate([p.bounds for p in parts]).astype(np.int64),
                   tuple(c for p in parts for c in p.crops),
                   np.concatenate([p.scores for p in parts]).astype(np.float32))

    def select(self, indices: Sequence[int]) -> "BoxMasks":
        """The masks at ``indices``, in that order."""
        idx = [int(i) for i in indices]
        return BoxMasks(self.image_size, self.bounds[idx] if idx else np.zeros((0, 4), np.int64),
                        tuple(self.crops[i] for i in idx), self.scores[idx].astype(np.float32))


class BoxToMask(abc.ABC):
    """Box→mask engine.

    Subclasses set :attr:`model_version` (a stable string that Label Studio stores with each
    prediction; it changes only when a new model is published) and implement :meth:`_predict`.
    Callers use :meth:`predict`, which guards every engine the same way.
    """

    #: Stable version string reported to Label Studio, e.g. "grabcut-v1" or "sim-v0003".
    model_version: str = "unknown"
    #: Seconds per box of the engine's last :meth:`predict` call (None before the first): the pace with
    #: which :func:`predict_valid_box_chunks` sizes its first chunk under a deadline.
    seconds_per_box: float | None = None

    def predict(self, image: np.ndarray, boxes: np.ndarray, labels: Sequence[str]) -> BoxMasks:
        """Segment the object inside each box.

        Args:
            image: (H, W, 3) uint8 RGB.
            boxes: (N, 4) float XYXY in pixels; every box must pass :func:`check_boxes` (use
                :func:`predict_valid_boxes` to skip the others); they are clipped to the image.
            labels: N class names, one per box (an engine may ignore them; an unknown label must not
                raise).

        Returns:
            :class:`BoxMasks` with one mask per box, in order.

        Raises:
            BoxToMaskError: a malformed image, boxes or labels (length mismatch, a box that fails
                :func:`check_boxes`), or an engine output that breaks the contract (wrong count or
                crop shape, values outside [0, 1], non-finite scores).
        """
        check_image(image)
        checks = check_boxes(boxes, image.shape[:2])
        if len(labels) != len(checks):
            raise BoxToMaskError(f"{len(checks)} boxes but {len(labels)} labels")
        bad = [f"box {i}: {c.reason}" for i, c in enumerate(checks) if not c.ok]
        if bad:
            raise BoxToMaskError("; ".join(bad))
        hw = tuple(int(v) for v in image.shape[:2])
        if not checks:
            return BoxMasks.empty(hw)
        clipped = np.stack([c.box for c in checks]).astype(np.float32)
        t0 = time.monotonic()
        crops, scores = self._predict(image, clipped, [str(label) for label in labels])
        self.seconds_per_box = (time.monotonic() - t0) / len(checks)
        return self._checked_output(hw, clipped, crops, scores)

    @abc.abstractmethod
    def _predict(self, image: np.ndarray, boxes: np.ndarray, labels: list[str]
                 ) -> tuple[Sequence[np.ndarray], np.ndarray]:
        """The engine's work, on validated input.

        Args:
            image: (H, W, 3) uint8 RGB.
            boxes: (N, 4) float32 XYXY in pixels, N >= 1, each clipped to the image with positive area.
            labels: N class names.

        Returns:
            crops: N float arrays, crop k over box k's pixel bounds (:func:`sim_model.boxes.box_pixel_bounds`),
                probabilities in [0, 1];
            scores: (N,) float mask-quality scores in [0, 1].
        """

    @staticmethod
    def _checked_output(hw: tuple[int, int], boxes: np.ndarray, crops: Sequence[np.ndarray],
                        scores: np.ndarray) -> BoxMasks:
        n = len(boxes)
        scores = np.asarray(scores, dtype=np.float32).reshape(-1)
        if len(crops) != n or scores.shape != (n,):
            raise BoxToMaskError(f"engine returned {len(crops)} masks and {scores.shape[0]} scores for {n} boxes")
        bounds = np.array([box_pixel_bounds(b, hw) for b in boxes], np.int64).reshape(n, 4)
        out = []
        for k, (crop, (c0, r0, c1, r1)) in enumerate(zip(crops, bounds.tolist())):
            crop = np.asarray(crop, dtype=np.float32)
            if crop.shape != (r1 - r0, c1 - c0):
                raise BoxToMaskError(f"engine returned mask {k} of shape {crop.shape}; its box covers "
                                     f"{(r1 - r0, c1 - c0)} pixels")
            if crop.size and not (np.isfinite(crop).all() and crop.min() >= 0.0 and crop.max() <= 1.0):
                raise BoxToMaskError(f"engine returned mask {k} with values outside [0, 1]")
            out.append(crop)
        if not (np.isfinite(scores).all() and np.all((scores >= 0.0) & (scores <= 1.0))):
            raise BoxToMaskError(f"engine returned scores outside [0, 1]: {scores.tolist()[:8]}")
        return BoxMasks(hw, bounds, tuple(out), scores)


@dataclass(frozen=True)
class ValidBoxPrediction:
    """Result of :func:`predict_valid_boxes`.

    Attributes:
        masks: :class:`BoxMasks` of the boxes that passed :func:`check_boxes`, in input order.
        kept: indices (into the input boxes) of those boxes; ``masks`` k belongs to box ``kept[k]``.
        skipped: (index, reason) of every box that was not segmented.
    """

    masks: BoxMasks
    kept: list[int]
    skipped: list[tuple[int, str]]


def predict_valid_boxes(engine: BoxToMask, image: np.ndarray, boxes: np.ndarray,
                        labels: Sequence[str], deadline: float | None = None) -> ValidBoxPrediction:
    """Check the boxes, segment the valid ones, and say why the others were skipped.

    Args:
        engine: any :class:`BoxToMask`.
        image: (H, W, 3) uint8 RGB.
        boxes: (N, 4) float XYXY in pixels (rows with NaN count as "non-finite coordinate").
        labels: N class names.
        deadline: ``time.monotonic()`` by which to stop, or None (every valid box in one engine call);
            see :func:`predict_valid_box_chunks`.

    Returns:
        :class:`ValidBoxPrediction`.

    Raises:
        BoxToMaskError: a malformed image or boxes array, a length mismatch, or a broken engine output.
    """
    parts = list(predict_valid_box_chunks(engine, image, boxes, labels, deadline))
    return ValidBoxPrediction(BoxMasks.concat(image.shape[:2], [p.masks for p in parts]),
                              [i for p in parts for i in p.kept], sorted(s for p in parts for s in p.skipped))


def predict_valid_box_chunks(engine: BoxToMask, image: np.ndarray, boxes: np.ndarray, labels: Sequence[str],
                             deadline: float | None = None) -> Iterator[ValidBoxPrediction]:
    """:func:`predict_valid_boxes` chunk by chunk, for a consumer that works on each chunk under the deadline.

    Without a deadline, one chunk holds every valid box (one engine call). With one, each chunk holds as
    many boxes as half the time left allows at the pace measured so far in this call, the consumer's work
    on the chunks before included (the generator's clock runs while it is suspended); the first chunk goes
    by the engine's :attr:`BoxToMask.seconds_per_box` of its last call, and is one box when the engine has
    none yet. So a request that fits is one engine call, the last chunks of one that does not are single
    boxes, and the consumer that stops asking at the deadline ends by it plus about one box's time. The last item lists the boxes skipped: the invalid ones with their reason, and
    those not reached by the deadline with :data:`DEADLINE_EXCEEDED`.

    Args:
        engine, image, boxes, labels: as :func:`predict_valid_boxes`.
        deadline: ``time.monotonic()`` by which to stop, or None.

    Yields:
        :class:`ValidBoxPrediction` of one chunk (``skipped`` empty), then one with no masks and every skip.

    Raises:
        BoxToMaskError: as :func:`predict_valid_boxes`.
    """
    check_image(image)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) if len(boxes) else np.zeros((0, 4))
    if len(labels) != len(boxes):
        raise BoxToMaskError(f"{len(boxes)} boxes but {len(labels)} labels")
    checks = check_boxes(boxes, image.shape[:2])
    valid = [i for i, c in enumerate(checks) if c.ok]
    skipped = [(i, c.reason) for i, c in enumerate(checks) if not c.ok]
    done, n, t0 = 0, len(valid), time.monotonic()
    while done < len(valid) and (deadline is None or time.monotonic() < deadline):
        if deadline is not None:  # seconds per box → as many boxes as half the time left allows
            pace = (time.monotonic() - t0) / done if done else engine.seconds_per_box
            n = 1 if pace is None else max(1, int((deadline - time.monotonic()) / 2 / max(pace, 1e-9)))
        chunk = valid[done:done + n]
        masks = engine.predict(image, np.stack([checks[i].box for i in chunk]), [labels[i] for i in chunk])
        done += len(chunk)
        yield ValidBoxPrediction(masks, chunk, [])
    skipped += [(i, DEADLINE_EXCEEDED) for i in valid[done:]]
    yield ValidBoxPrediction(BoxMasks.empty(image.shape[:2]), [], sorted(skipped))


__all__ = ["DEADLINE_EXCEEDED", "BoxToMask", "BoxToMaskError", "BoxMasks", "BoxCheck", "ValidBoxPrediction", "check_image",
           "check_boxes", "predict_valid_boxes", "predict_valid_box_chunks"]
