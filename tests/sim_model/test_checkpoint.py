"""sim_model.checkpoint.grow_class_rows: a parent version's weights carried over when the project's class map grows.

Class ids are stable (new labels are appended), so the parent's rows of every class-dependent tensor
must stay at the same ids in the grown network, for the student and its momentum teacher, and the
grown checkpoint must load into the new network. The full retrain runs in tests/e2e/test_retrain_e2e.py.
"""
from __future__ import annotations

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from sim_model.checkpoint import checkpoint_iteration, grow_class_rows
from sim_model.config import get_sim_cfg
from sim_model.datasets import REPO_ROOT


def _cfg(n_classes: int):
    cfg = get_sim_cfg()
    cfg.merge_from_file(str(REPO_ROOT / "configs" / "SIM_EffLite0_FPN_cpu.yaml"))
    cfg.MODEL.FCOS.NUM_CLASSES = n_classes
    cfg.MODEL.EFFICIENTNET_LITE.PRETRAINED = False
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def test_grow_classes_keeps_old_rows_for_student_and_teacher(tmp_path):
    torch.manual_seed(0)
    parent = build_model(_cfg(3)).state_dict()
    sd = dict(parent)
    for k, v in parent.items():  # a trained parent also holds its momentum teacher (a different copy)
        if k.startswith("net."):
            sd["teacher.model." + k[4:]] = v.clone() + 1 if v.is_floating_point() else v.clone()
    sd["teacher.num_updates"] = torch.tensor(123)
    torch.save({"model": sd}, tmp_path / "parent.pth")

    cfg5 = _cfg(5)
    out = tmp_path / "grown.pth"
    report = grow_class_rows(tmp_path / "parent.pth", cfg5, 3, out)
    grown = torch.load(out, map_location="cpu", weights_only=False)["model"]
    assert "net.fcos.head.cls_logits.weight" in report.grown and "prototypes.prototypes" in report.grown
    for k in ("net.fcos.head.cls_logits.weight", "net.fcos.head.cls_logits.bias", "prototypes.prototypes",
              "teacher.model.fcos.head.cls_logits.weight"):
        assert grown[k].shape[0] == 5, k
        assert torch.equal(grown[k][:3], sd[k]), k          # old ids keep their rows
    assert torch.equal(grown["net.backbone.fpn_output3.weight"], sd["net.backbone.fpn_output3.weight"])
    assert torch.equal(grown["teacher.model.backbone.fpn_output3.weight"],
                       sd["teacher.model.backbone.fpn_output3.weight"])
    assert int(grown["teacher.num_updates"]) == 123

    model = build_model(cfg5)
    DetectionCheckpointer(model).load(str(out))  # strict shapes: would raise on a mismatch
    assert model.teacher is not None
    assert torch.equal(model.net.fcos.head.cls_logits.weight[:3], sd["net.fcos.head.cls_logits.weight"])
    assert torch.equal(model.teacher.model.fcos.head.cls_logits.weight[:3].detach(),
                       sd["teacher.model.fcos.head.cls_logits.weight"])


def test_checkpoint_iteration(tmp_path):
    torch.save({"model": {}, "iteration": 699}, tmp_path / "a.pth")
    torch.save({"model": {}}, tmp_path / "b.pth")
    assert checkpoint_iteration(tmp_path / "a.pth") == 699 and checkpoint_iteration(tmp_path / "b.pth") == -1
