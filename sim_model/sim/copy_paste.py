"""Online weakly-supervised copy-paste (SIM §3.3, Eq. 9, supplement §6.1).

A first-in-first-out :class:`MemoryBank` keeps recent training images with their pseudo masks M̂′,
classes and mask scores S′ (Eq. 11). At each step an image is drawn from the bank, a subset of its
instances is drawn by importance sampling on S′ (:func:`sample_instances`), and they are pasted onto
the batch image (:func:`paste_instances`): the batch image's objects lose the covered pixels, their
boxes shrink to what remains, fully covered objects are dropped; the pasted instances carry their
pseudo masks, on which alone the paste loss of Eq. 9 is computed. :func:`copy_paste_batch` does this for
every image of a training batch, and :func:`paste_masks_on_grid` samples the pasted masks on the
network's mask grid for the losses.

The bank stores each instance as a crop (image pixels and mask inside the mask's bounding box) on the
CPU, so its memory is bounded by ``capacity`` images × their instances' box areas, not full images.

Config keys (``sim_model/config.py``): ``MODEL.SIM.COPY_PASTE.BANK_SIZE`` (paper 100),
``MODEL.SIM.COPY_PASTE.PASTE_FRACTION`` (a quarter of the instances, 0.25),
``MODEL.SIM.COPY_PASTE.MIN_PER_IMAGE`` (1) and ``MODEL.SIM.COPY_PASTE.MAX_PER_IMAGE`` (3).
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from sim_model.boxes import box_masks, mask_boxes


@dataclass
class BankEntry:
    """One image of the memory bank, its instances stored as crops (CPU tensors).

    Attributes:
        image_crops: K tensors (3, h_k, w_k), the image inside instance k's mask bounding box
            (dtype of the pushed image; uint8 recommended).
        mask_crops: K bool tensors (h_k, w_k), the pseudo mask M̂′ inside that box.
        classes: (K,) long class ids.
        scores: (K,) float32 mask scores S′_k (Eq. 11).
    """

    image_crops: list[torch.Tensor]
    mask_crops: list[torch.Tensor]
    classes: torch.Tensor
    scores: torch.Tensor

    def __len__(self) -> int:
        return len(self.mask_crops)


class MemoryBank:
    """FIFO memory bank of recent images with their pseudo masks, classes and S_k (SIM §3.3).

    Args:
        capacity: the most images kept (``MODEL.SIM.COPY_PASTE.BANK_SIZE``, paper 100); pushing onto a
            full bank drops the oldest image.
        max_side: ``MODEL.SIM.COPY_PASTE.MAX_BANK_SIDE`` (512): an image whose longest side exceeds it
            is stored at the scale that brings that side to ``max_side`` (its crops are shrunk, and
            so are the pasted instances); None keeps full resolution.

    The bank is a detectron2 checkpointable (:meth:`state_dict` / :meth:`load_state_dict`), so a
    resumed run does not start with an empty bank.

    Raises:
        ValueError: capacity < 1.
    """

    def __init__(self, capacity: int, max_side: int | None = None):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if max_side is not None and max_side < 1:
            raise ValueError(f"max_side must be >= 1 or None, got {max_side}")
        self.capacity = int(capacity)
        self.max_side = None if max_side is None else int(max_side)
        self._entries: deque[BankEntry] = deque(maxlen=self.capacity)

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, i: int) -> BankEntry:
        return self._entries[i]

    def push(self, image: torch.Tensor, masks: torch.Tensor, classes: torch.Tensor, scores: torch.Tensor) -> bool:
        """Store one image's instances (detached, copied to the CPU).

        Args:
            image: (3, H, W) image tensor, in the representation that will be pasted onto
                (the un-normalised uint8 ``image`` of detectron2's dataset dicts).
            masks: (N, H, W) bool (or {0, 1}) pseudo masks M̂ at the image's resolution.
            classes: (N,) int class ids.
            scores: (N,) float mask scores S_k (Eq. 11).

        Returns:
            True when stored; False when no instance has a non-empty mask (nothing is stored).

        Raises:
            ValueError: shapes that disagree.
        """
        if image.dim() != 3 or masks.dim() != 3 or masks.shape[1:] != image.shape[1:]:
            raise ValueError(f"image (3, H, W) {tuple(image.shape)} and masks (N, H, W) {tuple(masks.shape)} disagree")
        n = masks.shape[0]
        if classes.shape != (n,) or scores.shape != (n,):
            raise ValueError(f"{n} masks but classes {tuple(classes.shape)} and scores {tuple(scores.shape)}")
        image = image.detach().cpu()
        masks = masks.detach().cpu().bool()
        nonempty = masks.flatten(1).any(dim=1)
        if not bool(nonempty.any()):
            return False
        masks = masks[nonempty]
        boxes = mask_boxes(masks).long()
        image_crops, mask_crops = [], []
        longest = max(image.shape[1:])
        scale = 1.0 if self.max_side is None or longest <= self.max_side else self.max_side / longest
        for m, (x0, y0, x1, y1) in zip(masks, boxes.tolist()):
            crop, mcrop = image[:, y0:y1, x0:x1].clone(), m[y0:y1, x0:x1].clone()
            if scale < 1.0:
                crop, mcrop = _resize_crop(crop, mcrop, max(1, round((y1 - y0) * scale)),
                                           max(1, round((x1 - x0) * scale)))
            image_crops.append(crop)
            mask_crops.append(mcrop)
        self._entries.append(BankEntry(image_crops, mask_crops,
                                       classes.detach().cpu().long()[nonempty],
                                       scores.detach().cpu().float()[nonempty]))
        return True

    def sample(self, generator: torch.Generator | None = None) -> BankEntry:
        """A uniformly drawn stored image.

        Raises:
            IndexError: if the bank is empty.
        """
        if not self._entries:
            raise IndexError("the memory bank is empty")
        i = int(torch.randint(len(self._entries), (1,), generator=generator))
        return self._entries[i]

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and lists, for ``torch.save``."""
        return {"capacity": self.capacity,
                "entries": [{"image_crops": e.image_crops, "mask_crops": e.mask_crops,
                             "classes": e.classes, "scores": e.scores} for e in self._entries]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the entries saved by :meth:`state_dict` (the newest ``capacity`` of them)."""
        self._entries = deque((BankEntry(**e) for e in state["entries"]), maxlen=self.capacity)


def num_to_paste(num_instances: int, fraction: float, min_instances: int, max_instances: int) -> int:
    """How many instances of a bank image to paste: ``floor(fraction · N)`` clamped to
    [min_instances, max_instances] and to N (SIM §4.1: a quarter of the instances, 1–3 per image).

    Args:
        num_instances: N, instances of the drawn bank image.
        fraction: ``MODEL.SIM.COPY_PASTE.PASTE_FRACTION`` (0.25).
        min_instances: ``MODEL.SIM.COPY_PASTE.MIN_PER_IMAGE`` (1).
        max_instances: ``MODEL.SIM.COPY_PASTE.MAX_PER_IMAGE`` (3).
    """
    k = min(max(int(math.floor(fraction * num_instances)), min_instances), max_instances)
    return max(0, min(k, num_instances))


def sample_instances(scores: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Importance sampling of k distinct instances with probability proportional to S_k (supplement §6.1).

    Args:
        scores: (N,) float mask scores S_k >= 0 (negative values count as 0); all zero → uniform.
        k: how many to draw (at most N are returned).
        generator: torch.Generator for reproducible draws.

    Returns:
        (min(k, N),) long indices into ``scores``, without repetition.
    """
    scores = scores.detach().float().cpu().reshape(-1)
    n = scores.numel()
    k = min(int(k), n)
    if k <= 0:
        return torch.zeros(0, dtype=torch.long)
    p = scores.clamp_min(0)
    if float(p.sum()) <= 0:
        p = torch.ones(n)
    # multinomial without replacement needs k nonzero weights; give zero-score instances a tiny weight
    p = p + (p == 0).float() * p.max() * 1e-6
    return torch.multinomial(p, k, replacement=False, generator=generator)


@dataclass
class PasteResult:
    """Output of :func:`paste_instances` (tensors on the image's device).

    Attributes:
        image: (3, H, W) the image with the instances pasted (dtype of the input image).
        target_keep: (N,) bool, False for the image's objects that the pastes cover entirely (dropped).
        target_masks: (N_kept, H, W) bool, the kept objects' masks minus the covered pixels.
        target_boxes: (N_kept, 4) float32 XYXY pixels, each kept box shrunk to its remaining mask
            (intersected with the original box; unchanged when nothing of it is covered).
        paste_keep: (K,) bool, False for pasted instances covered entirely by later pastes.
        pasted_masks: (K_kept, H, W) bool pseudo masks of the pasted instances (later pastes on top).
        pasted_boxes: (K_kept, 4) float32 XYXY pixels, tight boxes of ``pasted_masks``.
        pasted_classes: (K_kept,) long.
        pasted_scores: (K_kept,) float32 S′_k.
    """

    image: torch.Tensor
    target_keep: torch.Tensor
    target_masks: torch.Tensor
    target_boxes: torch.Tensor
    paste_keep: torch.Tensor
    pasted_masks: torch.Tensor
    pasted_boxes: torch.Tensor
    pasted_classes: torch.Tensor
    pasted_scores: torch.Tensor


def paste_instances(image: torch.Tensor, target_masks: torch.Tensor, target_boxes: torch.Tensor,
                    image_crops: Sequence[torch.Tensor], mask_crops: Sequence[torch.Tensor],
                    offsets: torch.Tensor, classes: torch.Tensor, scores: torch.Tensor,
                    min_visible_pixels: int = 1) -> PasteResult:
    """Paste instance crops onto an image and fix the occluded annotations (SIM §3.3, Eq. 9).

    Crops are pasted in order, crop k's top-left corner at ``offsets[k]``; parts falling outside the
    image are clipped. A later paste covers earlier ones.

    Args:
        image: (3, H, W) target image (any dtype; crops are cast to it).
        target_masks: (N, H, W) bool masks of the image's objects (for box-only objects, filled boxes
            from :func:`sim_model.boxes.box_masks`).
        target_boxes: (N, 4) float XYXY pixels of those objects.
        image_crops: K tensors (3, h_k, w_k), pixels of the instances to paste.
        mask_crops: K bool tensors (h_k, w_k), their pseudo masks.
        offsets: (K, 2) int (x, y) pixel position of each crop's top-left corner in the image.
        classes: (K,) long class ids of the pasted instances.
        scores: (K,) float S′_k of the pasted instances.
        min_visible_pixels: ``MODEL.SIM.COPY_PASTE.MIN_VISIBLE_PIXELS`` (1): an object (or earlier
            paste) left with fewer visible pixels is dropped as fully occluded.

    Returns:
        :class:`PasteResult`.

    Raises:
        ValueError: shapes that disagree.
    """
    if image.dim() != 3:
        raise ValueError(f"image must be (3, H, W), got {tuple(image.shape)}")
    _, h, w = image.shape
    n = target_masks.shape[0]
    if target_masks.shape[1:] != (h, w) or target_boxes.shape != (n, 4):
        raise ValueError(f"target masks {tuple(target_masks.shape)} / boxes {tuple(target_boxes.shape)} do not "
                         f"match the {h}x{w} image")
    k_total = len(mask_crops)
    if len(image_crops) != k_total or offsets.shape != (k_total, 2) or classes.shape != (k_total,) \
            or scores.shape != (k_total,):
        raise ValueError(f"{k_total} mask crops but {len(image_crops)} image crops, offsets {tuple(offsets.shape)}, "
                         f"classes {tuple(classes.shape)}, scores {tuple(scores.shape)}")
    dev = image.device
    out = image.clone()
    pasted = torch.zeros((k_total, h, w), dtype=torch.bool, device=dev)
    for k, (crop, mcrop, (ox, oy)) in enumerate(zip(image_crops, mask_crops, offsets.tolist())):
        if mcrop.shape != crop.shape[1:]:
            raise ValueError(f"crop {k}: image {tuple(crop.shape)} and mask {tuple(mcrop.shape)} disagree")
        ch, cw = mcrop.shape
        x0, y0, x1, y1 = max(ox, 0), max(oy, 0), min(ox + cw, w), min(oy + ch, h)
        if x1 <= x0 or y1 <= y0:
            continue
        m = mcrop[y0 - oy:y1 - oy, x0 - ox:x1 - ox].to(dev).bool()
        c = crop[:, y0 - oy:y1 - oy, x0 - ox:x1 - ox].to(dev, out.dtype)
        region = out[:, y0:y1, x0:x1]
        out[:, y0:y1, x0:x1] = torch.where(m[None], c, region)
        full = torch.zeros((h, w), dtype=torch.bool, device=dev)
        full[y0:y1, x0:x1] = m
        pasted[:k] &= ~full  # earlier pastes lose what this one covers
        pasted[k] = full
    covered = pasted.any(dim=0)

    tmasks = target_masks.to(dev).bool()
    remaining = tmasks & ~covered
    target_keep = remaining.flatten(1).sum(dim=1) >= max(1, min_visible_pixels)
    touched = (tmasks & covered).flatten(1).any(dim=1)
    boxes = target_boxes.to(dev, torch.float32).clone()
    if bool((touched & target_keep).any()):
        idx = torch.nonzero(touched & target_keep).flatten()
        tight = mask_boxes(remaining[idx])
        b = boxes[idx]
        boxes[idx] = torch.cat([torch.maximum(b[:, :2], tight[:, :2]), torch.minimum(b[:, 2:], tight[:, 2:])], dim=1)

    paste_keep = pasted.flatten(1).sum(dim=1) >= max(1, min_visible_pixels)
    pmasks = pasted[paste_keep]
    return PasteResult(
        image=out,
        target_keep=target_keep,
        target_masks=remaining[target_keep],
        target_boxes=boxes[target_keep],
        paste_keep=paste_keep,
        pasted_masks=pmasks,
        pasted_boxes=mask_boxes(pmasks),
        pasted_classes=classes.to(dev).long()[paste_keep],
        pasted_scores=scores.to(dev).float()[paste_keep],
    )


def _resize_crop(crop: torch.Tensor, mcrop: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize an image crop (bilinear) and its mask (nearest) to h×w."""
    size = (h, w)
    dtype = crop.dtype
    c = F.interpolate(crop[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    if not dtype.is_floating_point:
        c = c.round().clamp(torch.iinfo(dtype).min, torch.iinfo(dtype).max)
    m = F.interpolate(mcrop[None, None].float(), size=size, mode="nearest")[0, 0] > 0.5
    return c.to(dtype), m


def _fit_crop(crop: torch.Tensor, mcrop: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shrink a crop (keeping its aspect ratio) so that it fits inside an h×w image."""
    ch, cw = mcrop.shape
    if ch <= h and cw <= w:
        return crop, mcrop
    s = min(h / ch, w / cw)
    return _resize_crop(crop, mcrop, max(1, min(h, int(ch * s))), max(1, min(w, int(cw * s))))


def copy_paste(bank: MemoryBank, image: torch.Tensor, target_masks: torch.Tensor, target_boxes: torch.Tensor,
               fraction: float, min_instances: int, max_instances: int, min_visible_pixels: int = 1,
               generator: torch.Generator | None = None) -> PasteResult | None:
    """SIM's online copy-paste for one training image: draw a bank image, importance-sample
    :func:`num_to_paste` of its instances by S′ (:func:`sample_instances`), paste each at a uniformly
    drawn position where it fits (crops larger than the image are shrunk to fit), fix the occlusions
    (:func:`paste_instances`).

    Args:
        bank: the memory bank (images of previous steps).
        image, target_masks, target_boxes: as in :func:`paste_instances`.
        fraction, min_instances, max_instances: see :func:`num_to_paste` (config keys there).
        min_visible_pixels: see :func:`paste_instances`.
        generator: torch.Generator (CPU) making the draws reproducible.

    Returns:
        :class:`PasteResult`, or None when the bank is empty.
    """
    if len(bank) == 0:
        return None
    _, h, w = image.shape
    entry = bank.sample(generator)
    k = num_to_paste(len(entry), fraction, min_instances, max_instances)
    idx = sample_instances(entry.scores, k, generator).tolist()
    crops, mcrops, offsets = [], [], []
    for i in idx:
        c, m = _fit_crop(entry.image_crops[i], entry.mask_crops[i], h, w)
        ch, cw = m.shape
        ox = int(torch.randint(w - cw + 1, (1,), generator=generator))
        oy = int(torch.randint(h - ch + 1, (1,), generator=generator))
        crops.append(c)
        mcrops.append(m)
        offsets.append((ox, oy))
    offsets_t = torch.tensor(offsets, dtype=torch.long).reshape(-1, 2)
    sel = torch.tensor(idx, dtype=torch.long)
    return paste_instances(image, target_masks, target_boxes, crops, mcrops, offsets_t,
                           entry.classes[sel], entry.scores[sel], min_visible_pixels=min_visible_pixels)


@dataclass
class PastedBatch:
    """A training batch after :func:`copy_paste_batch` (lists with one entry per image).

    Attributes:
        images: (3, H_i, W_i) images with the pastes.
        boxes: (M_i, 4) float32 XYXY px: the image's own objects that stay visible (boxes shrunk to
            what remains), then the pasted instances.
        classes: (M_i,) long class ids, same order.
        is_pasted: (M_i,) bool, True for the pasted instances.
        paste_masks: (K_i, H_i, W_i) bool pseudo masks of the pasted instances (the last K_i objects).
        kept: (N_i,) bool over the image's objects before the pastes: which of them stay (the first
            M_i − K_i objects, in order).
    """

    images: list[torch.Tensor]
    boxes: list[torch.Tensor]
    classes: list[torch.Tensor]
    is_pasted: list[torch.Tensor]
    paste_masks: list[torch.Tensor]
    kept: list[torch.Tensor]


def copy_paste_batch(bank: MemoryBank, images: Sequence[torch.Tensor], boxes: Sequence[torch.Tensor],
                     classes: Sequence[torch.Tensor], fraction: float, min_instances: int, max_instances: int,
                     min_visible_pixels: int = 1, generator: torch.Generator | None = None) -> PastedBatch:
    """SIM's online copy-paste (§3.3) on every image of a batch of box-supervised objects.

    Each image's objects are their filled boxes (:func:`sim_model.boxes.box_masks`); :func:`copy_paste`
    pastes bank instances on top. An image stays as it is when the bank is empty.

    Args:
        bank: the memory bank.
        images: N tensors (3, H, W).
        boxes: N tensors (M, 4) float XYXY px; classes: N tensors (M,) long.
        fraction, min_instances, max_instances, min_visible_pixels: see :func:`copy_paste`.
        generator: torch.Generator (CPU) making the draws reproducible.

    Returns:
        :class:`PastedBatch`.
    """
    out = PastedBatch([], [], [], [], [], [])
    for img, b, c in zip(images, boxes, classes):
        h, w = img.shape[1:]
        res = copy_paste(bank, img, box_masks(b, h, w), b, fraction, min_instances, max_instances,
                         min_visible_pixels, generator=generator)
        if res is None:
            out.images.append(img)
            out.boxes.append(b)
            out.classes.append(c)
            out.is_pasted.append(torch.zeros(b.shape[0], dtype=torch.bool, device=b.device))
            out.paste_masks.append(torch.zeros((0, h, w), dtype=torch.bool, device=b.device))
            out.kept.append(torch.ones(b.shape[0], dtype=torch.bool, device=b.device))
            continue
        out.images.append(res.image)
        out.boxes.append(torch.cat([res.target_boxes, res.pasted_boxes.to(b.device)]))
        out.classes.append(torch.cat([c[res.target_keep], res.pasted_classes.to(c.device)]))
        out.is_pasted.append(torch.cat([torch.zeros(res.target_boxes.shape[0], dtype=torch.bool),
                                        torch.ones(res.pasted_boxes.shape[0], dtype=torch.bool)]).to(b.device))
        out.paste_masks.append(res.pasted_masks)
        out.kept.append(res.target_keep.to(b.device))
    return out


def paste_masks_on_grid(paste_masks: Sequence[torch.Tensor], is_pasted: Sequence[torch.Tensor],
                        grid_hw: tuple[int, int], stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pasted instances' masks sampled on the network's mask grid (pixel centres ``stride // 2 + k·stride``).

    Args:
        paste_masks: N tensors (K_i, H_i, W_i) bool (:attr:`PastedBatch.paste_masks`).
        is_pasted: N tensors (M_i,) bool (:attr:`PastedBatch.is_pasted`); the K_i pasted objects are the
            last of the M_i.
        grid_hw: (Hm, Wm) of the mask grid (padded input size / ``stride``).
        stride: the mask-output stride (4).

    Returns:
        covered: (N, Hm, Wm) bool, the grid cells of each image covered by a pasted instance;
        paste_grid: (Σ M_i, Hm, Wm) float {0, 1}, the mask of every object of the batch on the grid
        (zero for the images' own objects).
    """
    hm, wm = grid_hw
    device = is_pasted[0].device if len(is_pasted) else torch.device("cpu")
    covered = torch.zeros((len(paste_masks), hm, wm), dtype=torch.bool, device=device)
    paste_grid = torch.zeros((sum(int(p.numel()) for p in is_pasted), hm, wm), device=device)
    start = stride // 2
    offset = 0
    for i, (pm, pasted) in enumerate(zip(paste_masks, is_pasted)):
        n_real = int((~pasted).sum())
        if pm.shape[0]:
            full = torch.zeros((pm.shape[0], hm * stride, wm * stride), dtype=torch.bool, device=device)
            full[:, : pm.shape[1], : pm.shape[2]] = pm.to(device)
            grid = full[:, start::stride, start::stride]
            covered[i] = grid.any(dim=0)
            paste_grid[offset + n_real: offset + n_real + pm.shape[0]] = grid.float()
        offset += int(pasted.numel())
    return covered, paste_grid
