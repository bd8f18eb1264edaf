"""MISA (IJCAI 2024): a box-supervised semantic segmentation (BSSS) teacher guiding the instance network.

- :mod:`sim_model.misa.bsss`: the BSSS network (``MODEL.META_ARCHITECTURE "BoxSemSeg"``), its box-only
  losses, its semantic mIoU evaluator, and loading it as a frozen teacher;
- :mod:`sim_model.misa.fsd`: Frequency-Space Distillation (Eq. 3–6);
- :mod:`sim_model.misa.sepa`: Semantic Enhanced Pairwise Affinity and its propagated pseudo labels
  (Eq. 7–15).

Training only: a MISA-trained instance network is served by the same SIM engine.
"""
