"""The network's checkpoints: loading a model version from its files, and checkpoint surgery.

- :func:`load_version_model` builds the CondInst network of a version's ``config.yaml`` and loads its
  ``model.pth`` (detectron2 checkpoint: student, momentum teacher, prototypes, iteration), refusing
  anything that does not match with a :class:`sim_model.registry.ModelVersionError` that says what.
- :func:`checkpoint_iteration` reads the trainer iteration a checkpoint was saved at.
- :func:`grow_class_rows` turns a checkpoint trained with C classes into one for C' > C classes
  (the project's class map grew): every class-dependent row of the old classes is kept.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.modeling import build_model

import sim_model.condinst  # noqa: F401  (registers CondInst and the backbones)
from sim_model.config import get_sim_cfg
from sim_model.registry import (CLASSES_FILE, CONFIG_FILE, WEIGHTS_FILE, ModelVersionError, check_version_dir,
                                read_classes)

log = logging.getLogger(__name__)


@dataclass
class VersionModel:
    """A model version in memory.

    Attributes:
        model: the ``CondInst`` network with every weight from ``model.pth``, in eval mode.
        cfg: its frozen detectron2 config (``config.yaml``, ``MODEL.DEVICE`` as asked).
        labels: class names, index = class id (``classes.json``).
    """

    model: torch.nn.Module
    cfg: CfgNode
    labels: list[str]


def load_version_model(path: str | os.PathLike, device: str = "cpu") -> VersionModel:
    """Build and load the model of a version directory (layout in :mod:`sim_model.registry`).

    Args:
        path: ``<model dir>/<project>/<version>/`` with ``config.yaml``, ``model.pth``, ``classes.json``.
        device: torch device for the model ("cpu", "cuda", …).

    Raises:
        ModelVersionError: a file is missing or unreadable, the config is not a SIM config, the
            checkpoint does not hold this network's weights (missing tensors or wrong shapes), or
            ``classes.json`` names more classes than the network has.
    """
    vdir = check_version_dir(path)
    labels = read_classes(vdir / CLASSES_FILE)
    cfg = get_sim_cfg()
    try:
        cfg.merge_from_file(str(vdir / CONFIG_FILE))
    except Exception as e:  # yaml errors, unknown keys, wrong types
        raise ModelVersionError(f"{vdir / CONFIG_FILE}: not a valid SIM config ({e.__class__.__name__}: {e})") from e
    cfg.MODEL.DEVICE = str(device)
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.EFFICIENTNET_LITE.PRETRAINED = False  # every weight comes from model.pth
    cfg.freeze()
    if len(labels) > cfg.MODEL.FCOS.NUM_CLASSES:
        raise ModelVersionError(f"{vdir / CLASSES_FILE}: {len(labels)} class names but the model has "
                                f"{cfg.MODEL.FCOS.NUM_CLASSES} classes")
    try:
        model = build_model(cfg)
    except Exception as e:
        raise ModelVersionError(f"{vdir / CONFIG_FILE}: cannot build the model ({e.__class__.__name__}: {e})") from e
    checkpointer = DetectionCheckpointer(model)
    weights = str(vdir / WEIGHTS_FILE)
    try:
        incompatible = checkpointer._load_model(checkpointer._load_file(weights))
    except Exception as e:  # truncated / not a torch file / wrong shapes
        raise ModelVersionError(f"{weights}: cannot load the checkpoint ({e.__class__.__name__}: {e})") from e
    missing = [k for k in incompatible.missing_keys if k.startswith("net.")]
    if missing:
        raise ModelVersionError(f"{weights} does not hold this model's weights: {len(missing)} missing, "
                                f"e.g. {missing[:3]}")
    if getattr(incompatible, "incorrect_shapes", []):
        raise ModelVersionError(f"{weights}: weights of the wrong shape for {vdir / CONFIG_FILE}: "
                                f"{incompatible.incorrect_shapes[:3]}")
    return VersionModel(model.eval(), cfg, labels)


def checkpoint_iteration(path: str | os.PathLike) -> int:
    """The trainer iteration a detectron2 checkpoint was saved after (-1 when it records none)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    return int(ckpt.get("iteration", -1)) if isinstance(ckpt, dict) else -1


@dataclass
class GrowReport:
    """What :func:`grow_class_rows` did: names of the grown and of the freshly initialised tensors."""

    grown: list[str]
    fresh: list[str]


def grow_class_rows(parent_ckpt: str | os.PathLike, cfg: CfgNode, n_old: int,
                    out_path: str | os.PathLike) -> GrowReport:
    """Weights for a network with more classes, from a parent checkpoint with the first ``n_old`` of them.

    Class ids are stable (new labels are appended to the class map), so every class-dependent tensor
    (classification logits, prototypes, for the student ``net.*`` and its momentum teacher
    ``teacher.model.*``, which mirrors it) keeps the parent's rows ``[:n_old]``; the rows of the new
    classes take the freshly built network's initialisation. Tensors of the same shape are copied;
    anything else keeps the new initialisation.

    Args:
        parent_ckpt: the parent version's ``model.pth`` (detectron2 checkpoint with ``"model"``).
        cfg: the new config (``MODEL.FCOS.NUM_CLASSES`` = new class count).
        n_old: the parent's class count.
        out_path: where to write the weights-only checkpoint (``{"model": state_dict}``).

    Returns:
        :class:`GrowReport`.
    """
    n_new = int(cfg.MODEL.FCOS.NUM_CLASSES)
    new_sd = build_model(cfg).state_dict()
    old_sd = torch.load(parent_ckpt, map_location="cpu", weights_only=False)["model"]
    out, grown, fresh = {}, [], []
    for k, ref in new_sd.items():
        v = old_sd.get(k)
        if v is None and k.startswith("teacher.model."):
            v = old_sd.get("net." + k[len("teacher.model."):])
        if v is None or not hasattr(v, "shape"):
            out[k] = ref if v is None else v
            if v is None:
                fresh.append(k)
            continue
        if tuple(v.shape) == tuple(ref.shape):
            out[k] = v
        elif (t := _grow_rows(v, ref, n_old, n_new)) is not None:
            out[k] = t
            grown.append(k)
        else:
            out[k] = ref
            fresh.append(k)
    # the momentum teacher is created when training starts, so the new network may lack its keys:
    # carry the parent's teacher over the same way, against the student's shapes
    for k, v in old_sd.items():
        if k in out or not k.startswith("teacher."):
            continue
        ref = new_sd.get("net." + k[len("teacher.model."):]) if k.startswith("teacher.model.") else None
        if ref is None or not hasattr(v, "shape") or tuple(v.shape) == tuple(ref.shape):
            out[k] = v
        elif (t := _grow_rows(v, ref, n_old, n_new)) is not None:
            out[k] = t
            grown.append(k)
    torch.save({"model": out}, out_path)
    return GrowReport(grown, fresh)


def _grow_rows(old: torch.Tensor, ref: torch.Tensor, n_old: int, n_new: int) -> torch.Tensor | None:
    """A class-dependent tensor grown from ``n_old`` to ``n_new`` classes along dim 0: the old rows of ``old``
    on top of ``ref``'s fresh rows; None when ``old`` is not such a tensor (other shape)."""
    if old.dim() >= 1 and old.shape[0] == n_old and ref.shape[0] == n_new and old.shape[1:] == ref.shape[1:]:
        t = ref.clone()
        t[:n_old] = old.to(t.dtype)
        return t
    return None


__all__ = ["VersionModel", "load_version_model", "checkpoint_iteration", "GrowReport", "grow_class_rows"]
