"""SIM's components (CVPR 2023), one function per equation, used by the training step (:mod:`sim_model.condinst`)
and the box→mask engine (:mod:`sim_model.engines.sim`):

- :mod:`.prototypes` — Sinkhorn-Knopp assignment (Eq. 2–3), class prototypes with EMA update (Eq. 4–5),
  semantic map M_S (Eq. 1);
- :mod:`.pseudo_masks` — positive weights and instance map M_I (Eq. 6), rectification (Eq. 7),
  thresholds and the BCE + Dice pseudo-mask loss with ignore mask (Eq. 8), mask score S_k (Eq. 11), and the
  chain Eq. 6 → 1 → 7 → 8 → 11 (:func:`~.pseudo_masks.sim_pseudo_masks`);
- :mod:`.teacher` — the momentum (EMA) teacher (§3.4) and its pass in a training step;
- :mod:`.copy_paste` — FIFO memory bank, importance sampling by S_k, paste with occlusion updates (Eq. 9);
- :mod:`.losses` — SIM's losses and state updates of one training step.
"""
