"""SIMBoxToMask on a real model version (one SIM training iteration, ``sim_version_dir``) and a real coco-mini
image: loading, the mask chain (M_I, M_S, rectification, S_k), the unknown-label fallback, the per-image
feature cache, and clear errors for broken version directories."""
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sim_model.box_to_mask import BoxToMaskError
from sim_model.boxes import box_pixel_bounds
from sim_model.engines.sim import SIMBoxToMask
from sim_model.registry import ModelVersionError
from tests.support import COCO_VAL_IMAGES, COCO_VAL_JSON


def _image():
    data = json.loads(COCO_VAL_JSON.read_text())
    info = sorted(data["images"], key=lambda i: i["id"])[0]
    img = cv2.cvtColor(cv2.imread(str(COCO_VAL_IMAGES / info["file_name"])), cv2.COLOR_BGR2RGB)
    anns = [a for a in data["annotations"] if a["image_id"] == info["id"] and a["bbox"][2] > 20 and a["bbox"][3] > 20]
    boxes = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                      for a in anns[:2]], dtype=np.float32)
    assert len(boxes) == 2
    return img, boxes


@pytest.fixture(scope="module")
def engine(sim_version_dir):
    return SIMBoxToMask.from_version_dir(sim_version_dir)


@pytest.fixture()
def counted_passes(engine, monkeypatch):
    """The list that gets one entry per network pass of the engine (its feature cache cleared)."""
    import sim_model.engines.sim as sim_engine

    calls = []
    real = sim_engine.image_features
    monkeypatch.setattr(sim_engine, "image_features", lambda *a, **k: calls.append(1) or real(*a, **k))
    engine._cache.clear()
    return calls


def _labels(engine):
    """(a label with prototypes, a known label without prototypes)."""
    init = engine.model.prototypes.initialized.tolist()
    assert any(init) and not all(init)
    return engine.class_names[init.index(True)], engine.class_names[init.index(False)]


def test_from_version_dir_restores_the_model(engine, sim_version_dir):
    assert engine.model_version == "sim-v0001"
    assert len(engine.class_names) == 80 and engine.class_names[0] == "person"
    state = torch.load(sim_version_dir / "model.pth", map_location="cpu", weights_only=False)["model"]
    assert torch.equal(engine.model.prototypes.prototypes, state["prototypes.prototypes"])
    assert torch.equal(engine.model.prototypes.initialized, state["prototypes.initialized"])
    assert engine.model.teacher is not None  # the teacher makes the pseudo masks, as in training
    for prefix in ("net.", "teacher.model."):
        k = next(k for k in state if k.startswith(prefix) and state[k].dtype.is_floating_point and state[k].dim() == 4)
        assert torch.equal(engine.model.state_dict()[k], state[k])
    assert (engine.mu, engine.alpha, engine.tau, engine.tau_low, engine.tau_high) == (5.0, 0.5, 1.0, 0.3, 0.7)
    assert list(engine.resize.short_edge_length) == [256, 256]  # INPUT.MIN_SIZE_TEST from config.yaml
    assert not engine.model.training


def test_masks_are_box_local_probabilities_with_their_scores(engine):
    img, boxes = _image()
    with_protos, _ = _labels(engine)
    masks = engine.predict(img, boxes, [with_protos, "not-a-class"])
    assert len(masks) == 2 and masks.image_size == img.shape[:2] and masks.scores.dtype == np.float32
    for k, b in enumerate(boxes):
        c0, r0, c1, r1 = box_pixel_bounds(b, img.shape[:2])
        crop = masks.crops[k]
        assert crop.shape == (r1 - r0, c1 - c0) and crop.dtype == np.float32
        assert crop.min() >= 0 and crop.max() <= 1 and crop.max() > 0


def test_known_class_is_rectified_with_its_prototypes(engine):
    """M̂ = (1 − α) M_S + α M_I, M_S from the class's prototypes (Eq. 1, 7), on the box's pixels."""
    img, boxes = _image()
    with_protos, without_protos = _labels(engine)
    m_i = engine.predict(img, boxes[:1], [without_protos]).crops[0]  # no prototypes: M_I alone
    rectified = engine.predict(img, boxes[:1], [with_protos]).crops[0]
    assert np.abs(rectified - m_i).max() > 1e-3
    _, feats = engine.image_features(img)
    assert feats.net is engine.model.teacher.model
    z = F.normalize(feats.mask_features, dim=0)
    m_s, valid = engine.model.prototypes.semantic_map(z, [engine.class_names.index(with_protos)], tau=1.0)
    assert valid.tolist() == [True]
    c0, r0, c1, r1 = box_pixel_bounds(boxes[0], img.shape[:2])
    m_s_box = feats.to_image(m_s, img.shape[:2])[0, r0:r1, c0:c1].numpy()
    np.testing.assert_allclose(rectified, (0.5 * m_s_box + 0.5 * m_i).clip(0, 1), atol=1e-5)


def test_unknown_label_falls_back_to_the_instance_map(engine):
    img, boxes = _image()
    _, without_protos = _labels(engine)
    unknown = engine.predict(img, boxes[:1], ["not-a-class"])
    known_without = engine.predict(img, boxes[:1], [without_protos])
    np.testing.assert_allclose(unknown.crops[0], known_without.crops[0], atol=1e-6)


def test_score_is_the_mean_probability_over_the_pseudo_mask(engine):
    """S_k = mean of M̂_prob over its pixels ≥ τ_high (Eq. 11)."""
    img, boxes = _image()
    masks = engine.predict(img, boxes, list(_labels(engine)))
    for crop, s in zip(masks.crops, masks.scores):
        fg = crop >= 0.7
        assert s == pytest.approx(float(crop[fg].mean()) if fg.any() else 0.0, abs=1e-5)


def test_boxes_are_independent_of_their_batch(engine):
    img, boxes = _image()
    labels = list(_labels(engine))
    both = engine.predict(img, boxes, labels)
    alone = engine.predict(img, boxes[1:], labels[1:])
    np.testing.assert_allclose(alone.crops[0], both.crops[1], atol=1e-6)
    assert alone.scores[0] == pytest.approx(both.scores[1], abs=1e-6)
    twice = engine.predict(img, np.concatenate([boxes[:1], boxes[:1]]), labels[:1] * 2)
    np.testing.assert_array_equal(twice.crops[0], twice.crops[1])


def test_one_network_pass_per_image(engine, counted_passes):
    img, boxes = _image()
    labels = list(_labels(engine))
    engine.predict(img, boxes, labels)
    engine.predict(img, boxes[1:], labels[1:])  # a later box on the same image: the cached pass
    assert len(counted_passes) == 1
    engine.predict(np.ascontiguousarray(img[::-1]), boxes[1:], labels[1:])  # another image
    assert len(counted_passes) == 2
    engine.feature_cache_size = 0
    try:
        again = engine.predict(img, boxes[1:], labels[1:])
    finally:
        engine.feature_cache_size = 4
    assert len(counted_passes) == 3  # without the cache: a pass per call, the same masks
    np.testing.assert_allclose(again.crops[0], engine.predict(img, boxes[1:], labels[1:]).crops[0], atol=1e-6)


def test_predict_bad_input_and_empty(engine):
    img, boxes = _image()
    empty = engine.predict(img, np.zeros((0, 4), np.float32), [])
    assert len(empty) == 0 and empty.scores.shape == (0,)
    with pytest.raises(BoxToMaskError):
        engine.predict(img, boxes, ["person"])  # length mismatch
    with pytest.raises(BoxToMaskError):
        engine.predict(img[:, :, 0], boxes, ["person", "dog"])


def _copy_version(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in ("model.pth", "config.yaml", "classes.json"):
        (dst / f).write_bytes((src / f).read_bytes())
    return dst


@pytest.mark.parametrize("name, damage, message", [
    ("missing", lambda d, src: (d / "model.pth").unlink(), "lacks model.pth"),
    ("truncated", lambda d, src: (d / "model.pth").write_bytes((src / "model.pth").read_bytes()[:1000]),
     "cannot load the checkpoint"),
    ("foreign", lambda d, src: torch.save({"model": {"conv.weight": torch.zeros(3)}}, d / "model.pth"),
     "does not hold this model's weights"),
    ("classes", lambda d, src: (d / "classes.json").write_text('{"labels": ["a", '), "classes.json"),
    ("classes81", lambda d, src: (d / "classes.json").write_text(json.dumps({"labels": [f"c{i}" for i in range(81)]})),
     "81 class names but the model has 80"),
    ("config", lambda d, src: (d / "config.yaml").write_text("MODEL:\n  NOT_A_KEY: 1\n"), "not a valid SIM config"),
])
def test_broken_version_directories_are_refused_naming_the_fault(sim_version_dir, tmp_path, name, damage, message):
    d = _copy_version(sim_version_dir, tmp_path / name)
    damage(d, sim_version_dir)
    with pytest.raises(ModelVersionError, match=message):
        SIMBoxToMask.from_version_dir(d)


def test_missing_version_directory_is_refused(tmp_path):
    with pytest.raises(ModelVersionError, match="does not exist"):
        SIMBoxToMask.from_version_dir(tmp_path / "nope")


def test_the_close_look_sees_only_the_window_around_each_box(sim_version_dir, monkeypatch):
    import sim_model.engines.sim as sim_engine

    close = SIMBoxToMask.from_version_dir(sim_version_dir, close_look=True, feature_cache_size=0)
    img, boxes = _image()
    sizes = []
    real = sim_engine.image_features
    monkeypatch.setattr(sim_engine, "image_features", lambda m, t, **k: sizes.append(tuple(t.shape[1:])) or real(m, t, **k))
    masks = close.predict(img, boxes, ["person", "person"])
    bc = close.cfg.INPUT.BOX_CROP
    assert len(sizes) == 2  # one pass per box, on its window resized to the close look's size
    assert all(min(s) <= bc.MIN_SIZE_TEST and max(s) <= bc.MAX_SIZE_TEST for s in sizes)
    assert any(min(s) == bc.MIN_SIZE_TEST for s in sizes)
    # what lies outside a box's window changes nothing: paint everything else
    for k, box in enumerate(boxes):
        x0, y0, x1, y1 = sim_engine.context_window(box, img.shape[:2], close.context)
        other = np.full_like(img, 127)
        other[y0:y1, x0:x1] = img[y0:y1, x0:x1]
        again = close.predict(other, box[None], ["person"])
        assert np.allclose(again.crops[0], masks.crops[k], atol=1e-5)
    whole = SIMBoxToMask.from_version_dir(sim_version_dir, close_look=False, feature_cache_size=0)
    sizes.clear()
    whole.predict(img, boxes, ["person", "person"])
    assert len(sizes) == 1  # without it, one pass for the image


def test_the_box_query_runs_the_head_only_where_the_box_is_and_changes_no_mask(engine):
    """:func:`image_features` runs no FCOS head; a box's query runs it (without the classification tower) on
    the levels of its positives only, and the positives' boxes and mask logits of a real box equal those of
    the full pass (the one detectron2's inference and training run)."""
    from sim_model.modeling.box_queries import image_features, positive_masks

    img, boxes = _image()
    tf = engine.resize.get_transform(img)
    resized = tf.apply_image(img)
    resized = resized[:, :, ::-1] if engine.input_format == "BGR" else resized
    tensor = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)).astype(np.float32))
    fast = image_features(engine.model, tensor)
    assert not fast._head
    calls = []
    run_level = fast.net.fcos.head.forward_level
    fast.net.fcos.head.forward_level = lambda f, lvl, **kw: calls.append(lvl) or run_level(f, lvl, **kw)
    net = fast.net.eval()
    with torch.no_grad():
        full_out = net(engine.model.preprocess_image([tensor]).tensor)
    head = full_out.head
    assert head.logits.shape[-1] == engine.model.num_classes
    torch.testing.assert_close(fast.locations, head.locations)
    h, w = tensor.shape[1:]
    box = torch.tensor([0.1 * w, 0.1 * h, 0.9 * w, 0.9 * h])  # a big box: its positives lie after P3
    _, _, idx = net.fcos.assign_targets_single(head.locations, head.levels, head.strides, box[None],
                                               torch.zeros(1, dtype=torch.long))
    loc = torch.nonzero(idx >= 0).squeeze(1)
    assert loc.numel() > 0 and bool((head.levels[loc] > 0).any())  # a level after P3: the offsets matter
    calls.clear()  # (the full pass above ran every level)
    with torch.no_grad():
        full_boxes, full_logits = head.boxes()[0][loc], net.mask_logits(full_out, torch.zeros_like(loc), loc)[:, 0]
    fast_boxes, fast_logits = positive_masks(fast, box)
    torch.testing.assert_close(fast_boxes, full_boxes)
    torch.testing.assert_close(fast_logits, full_logits)
    assert set(fast._head) == set(head.levels[loc].tolist()) and len(fast._head) < len(fast.head_features)
    assert sorted(calls) == sorted(fast._head)  # each of those levels ran once
    # a second query on the same image reuses the levels already computed, and stays exact
    again_boxes, _ = positive_masks(fast, box)
    torch.testing.assert_close(again_boxes, full_boxes)
    assert sorted(calls) == sorted(fast._head)
    del fast.net.fcos.head.forward_level


def test_a_cpu_model_runs_channels_last_with_the_same_masks(sim_version_dir):
    """A CondInst built for the CPU keeps its weights in channels-last memory format (faster oneDNN
    convolutions; the loaded version's too), and the engine's masks stay those of the contiguous model."""
    fast = SIMBoxToMask.from_version_dir(sim_version_dir, feature_cache_size=0)
    weights = [p for p in fast.model.parameters() if p.dim() == 4]
    assert weights and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
    assert not all(p.is_contiguous() for p in weights)  # (1×1 convolutions are both)
    plain = SIMBoxToMask.from_version_dir(sim_version_dir, feature_cache_size=0)
    plain.model.to(memory_format=torch.contiguous_format)
    assert all(p.is_contiguous() for p in plain.model.parameters())
    img, boxes = _image()
    labels = [_labels(fast)[0]] * len(boxes)
    a, b = fast.predict(img, boxes, labels), plain.predict(img, boxes, labels)
    for k in range(len(boxes)):
        np.testing.assert_allclose(a.crops[k], b.crops[k], atol=1e-4)
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-4)


def test_eval_mode_switches_a_training_network_and_leaves_an_eval_one_alone(engine, monkeypatch):
    from sim_model.modeling.box_queries import eval_mode

    net = engine.model.net
    assert not net.training
    switches = []
    real_train = torch.nn.Module.train
    monkeypatch.setattr(torch.nn.Module, "train", lambda m, mode=True: switches.append(mode) or real_train(m, mode))
    with eval_mode(net):
        assert not net.training
    assert switches == []  # already wholly in eval mode: no walk over the submodules
    net.mask_head.train()  # one submodule in training mode is enough to switch
    try:
        with eval_mode(net):
            assert not any(m.training for m in net.modules())
        assert switches and not net.training and net.mask_head.training  # each submodule's own mode restored
        assert not any(m.training for name, m in net.named_modules() if not name.startswith("mask_head"))
        net.train()
        net.backbone.eval()  # a part kept frozen inside a training network stays frozen
        with eval_mode(net):
            assert not any(m.training for m in net.modules())
        assert not any(m.training for m in net.backbone.modules())
        assert all(m.training for name, m in net.named_modules() if not name.startswith("backbone"))
    finally:
        real_train(net, False)
