"""Publishing a trained model: write the version, measure it against the served engine, pass the gate.

:func:`write_version` writes a complete version directory (``model.pth``, ``config.yaml``,
``classes.json``, ``metrics.json``, ``train_log.txt``) under a temporary name and renames it into place
(:meth:`sim_model.registry.ModelRegistry.create_version`); the validation of the new version runs on
the temporary directory, so ``metrics.json`` is complete when the version appears.
:func:`validate_against_served` is that validation: box→mask mIoU / AP on the held-out annotator masks
for the new version's map with each combination of its colour steps (``refine``, ``vote``;
:func:`choose_variant` picks what the version serves, recorded as ``metrics["engine"]``), for GrabCut and for
the engine served now, all on the same masks; the gate (:meth:`sim_model.registry.ModelRegistry.publish`)
then decides what serves.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
from detectron2.config import CfgNode

from sim_model.engines import cold_start_engine, served_engine, version_engine
from sim_model.evaluation import evaluate_box_to_mask
from sim_model.files import atomic_write_text
from sim_model.registry import (CLASSES_FILE, CONFIG_FILE, METRICS_FILE, TEACHER_CONFIG_FILE, TEACHER_WEIGHTS_FILE,
                                TRAIN_LOG_FILE, WEIGHTS_FILE, ModelRegistry, engine_variants, jsonable,
                                served_variant_steps)


def evaluation_summary(ev: dict) -> dict:
    """The figures of :func:`sim_model.evaluation.evaluate_box_to_mask` worth storing (no per-box lists),
    plus ``n_masks`` (validation masks scored) and ``n_skipped``."""
    out = {k: v for k, v in ev.items() if k not in ("per_box", "skipped")}
    out["n_masks"] = int(ev.get("n_boxes", 0))
    out["n_skipped"] = len(ev.get("skipped", []))
    return jsonable(out)


def choose_variant(per_box_iou: Mapping[str, Sequence[float]], default: str, switch_z: float) -> str:
    """The variant a new version serves, from each variant's IoU on the same held-out masks.

    ``default`` serves unless another variant beats it by more than ``switch_z`` standard errors of the
    paired per-box differences (mean(d) > z·sd(d)/√n, d = IoU(variant) − IoU(default) per box); among
    those that do, the highest mean IoU serves (ties: the first listed). Fewer than 2 masks keep the default.
    Not in the papers: the plain best of a few masks picks by noise (``RETRAIN.GATE`` in
    :mod:`sim_model.config`).

    Args:
        per_box_iou: variant name → its IoU per held-out box (floats in [0, 1]), the boxes in the same order
            for every variant.
        default: ``RETRAIN.GATE.DEFAULT_VARIANT``, a key of ``per_box_iou``.
        switch_z: ``RETRAIN.GATE.SWITCH_Z`` (>= 0; 0 = the plain best mean).

    Raises:
        ValueError: ``default`` not among the variants, lists of different lengths, or a negative or
            non-finite ``switch_z``.
    """
    if default not in per_box_iou:
        raise ValueError(f"default variant {default!r} not among the measured {list(per_box_iou)}")
    if not (np.isfinite(switch_z) and switch_z >= 0):
        raise ValueError(f"switch_z must be a finite number >= 0, got {switch_z}")
    ious = {name: np.asarray(v, np.float64) for name, v in per_box_iou.items()}
    n = len(ious[default])
    if any(len(v) != n for v in ious.values()):
        raise ValueError(f"per-box IoU lists of different lengths: { {k: len(v) for k, v in ious.items()} }")
    if n < 2:
        return default
    better = []
    for name, v in ious.items():
        d = v - ious[default]
        if name != default and d.mean() > switch_z * d.std(ddof=1) / np.sqrt(n):  # z·se >= 0: a gain
            better.append(name)
    return max(better, key=lambda name: ious[name].mean()) if better else default


def validate_against_served(version_dir: Path, version: str, registry: ModelRegistry, project: str,
                            val_json: Path, image_dir: Path, say: Callable[[str], None], *,
                            default_variant: str = "vote", switch_z: float = 2.0) -> dict:
    """The gate's measurements on the held-out annotator masks, all on the same masks: the new version's
    map alone and with each combination of its colour steps (:func:`sim_model.registry.engine_variants`;
    :func:`choose_variant` picks what the version serves), GrabCut alone, and the engine served now.

    Args:
        version_dir: the new version's (temporary) directory.
        version: its name.
        registry, project: where the served engine comes from (:func:`sim_model.engines.served_engine`).
        val_json, image_dir: the validation set (COCO json with masks, cached images).
        say: progress lines.
        default_variant, switch_z: ``RETRAIN.GATE.DEFAULT_VARIANT`` / ``SWITCH_Z`` (:func:`choose_variant`).

    Returns:
        ``{"val": the served variant's figures, "variants": {"map": …, "refine": …, "vote": …, "refine+vote":
        …}, "engine": {"refine": bool, "vote": bool}, "gate": {"default_variant", "switch_z", "per_box_iou":
        {variant: [IoU per held-out box, annotation-id order]}} (the choice, reproducible), "grabcut":
        GrabCut's figures, "baseline": the served engine's figures (+ "version")}``.

    Raises:
        ValueError: an unknown ``default_variant`` or a bad ``switch_z`` (:func:`choose_variant`).
    """
    def measure(engine) -> tuple[dict, list[float]]:
        """(figures, IoU per held-out box in annotation-id order)."""
        ev = evaluate_box_to_mask(engine, val_json, image_dir, progress=False)
        return evaluation_summary(ev), [b["iou"] for b in sorted(ev["per_box"], key=lambda b: b["ann_id"])]

    served_variant_steps(default_variant)  # an unknown default fails before the measurements
    variants, ious = {}, {}
    for name, steps in engine_variants().items():
        engine = version_engine(version_dir, version=version, steps=steps)
        say(f"evaluating {engine.model_version} on the annotator masks")
        variants[name], ious[name] = measure(engine)
    best = choose_variant(ious, default_variant, switch_z)
    say("evaluating GrabCut (the cold start) on the same masks")
    grabcut = measure(cold_start_engine())[0]
    base_engine = served_engine(registry, project, on_error=lambda e: say(
        f"the served version cannot be loaded ({e}): comparing with the cold start, which the backend serves instead"))
    if base_engine.model_version == grabcut.get("model_version"):
        baseline = dict(grabcut)
    else:
        say(f"evaluating the served engine ({base_engine.model_version}) on the same masks")
        baseline = measure(base_engine)[0]
    baseline["version"] = registry.current_version(project)
    say(f"{version}: " + ", ".join(f"{n} mIoU {v['mIoU']:.4f}" for n, v in variants.items())
        + f" (serves {'the map' if best == 'map' else '+' + best}); GrabCut {grabcut['mIoU']:.4f}; "
        f"served {baseline['mIoU']:.4f}")
    return {"val": variants[best], "variants": variants, "engine": served_variant_steps(best),
            "gate": {"default_variant": default_variant, "switch_z": switch_z, "per_box_iou": ious},
            "grabcut": grabcut, "baseline": baseline}


def write_version(registry: ModelRegistry, project: str, *, weights: Path, cfg: CfgNode, labels: list[str],
                  metrics: dict, train_log: Path | None = None,
                  validate: Callable[[Path, str], dict] | None = None,
                  teacher: tuple[Path, Path] | None = None) -> tuple[str, dict]:
    """Write the next version of ``project`` completely, then rename it into place (not yet served).

    Args:
        weights: the trained checkpoint (copied as ``model.pth``).
        cfg: the config it was trained with (``config.yaml``).
        labels: the class map (``classes.json``).
        metrics: what ``metrics.json`` holds (``version`` and ``created_at`` are added).
        train_log: the training log to keep (``train_log.txt``; empty when None).
        validate: called with (temporary directory, version name); its dict is merged into the metrics.
        teacher: MISA's BSSS teacher (config.yaml, checkpoint), kept as ``bsss_config.yaml`` /
            ``bsss_model.pth``; the version's config names them (``MODEL.MISA.TEACHER.*``) relative to its
            folder (:func:`training.train.build_config` resolves them there).

    Returns:
        (version name, the metrics written).

    Raises:
        Exception: whatever writing or ``validate`` raised; no version is then left behind.
    """
    with registry.create_version(project) as (version, vdir):
        shutil.copyfile(weights, vdir / WEIGHTS_FILE)
        if teacher is not None:
            shutil.copyfile(teacher[0], vdir / TEACHER_CONFIG_FILE)
            shutil.copyfile(teacher[1], vdir / TEACHER_WEIGHTS_FILE)
            cfg = cfg.clone()
            cfg.defrost()
            cfg.MODEL.MISA.TEACHER.CONFIG = TEACHER_CONFIG_FILE
            cfg.MODEL.MISA.TEACHER.WEIGHTS = TEACHER_WEIGHTS_FILE
        (vdir / CONFIG_FILE).write_text(cfg.dump())
        (vdir / CLASSES_FILE).write_text(json.dumps({"labels": list(labels)}, indent=2))
        if train_log is not None and Path(train_log).is_file():
            shutil.copyfile(train_log, vdir / TRAIN_LOG_FILE)
        else:
            (vdir / TRAIN_LOG_FILE).write_text("")
        metrics = dict(metrics, version=version, created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        if validate is not None:
            metrics.update(validate(vdir, version))
        atomic_write_text(vdir / METRICS_FILE, json.dumps(jsonable(metrics), indent=2))
    return version, metrics


__all__ = ["choose_variant", "evaluation_summary", "validate_against_served", "write_version"]
