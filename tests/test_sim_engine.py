"""SIMBoxToMask: a real (randomly initialised, tiny test resolution) CondInst model version on a real
coco-mini image — loading, shapes, ranges, box restriction, rectification, the unknown-label fallback,
one network pass per image, and clear errors for broken version directories."""
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sim_model.box_to_mask import BoxToMaskError
from sim_model.engines.shape_prior import box_mask
from sim_model.engines.sim import ModelVersionError, SIMBoxToMask

COCO = Path("/work/shared/data/coco-mini/val2017")
LABELS = ["person", "dog", "kite"]


def _cfg():
    from sim_model.config import get_sim_cfg

    cfg = get_sim_cfg()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.EFFICIENTNET_LITE.PRETRAINED = False  # random init: a plumbing test
    cfg.MODEL.FCOS.NUM_CLASSES = len(LABELS)
    cfg.MODEL.SIM.ENABLED = True
    cfg.INPUT.MIN_SIZE_TEST = 192
    cfg.INPUT.MAX_SIZE_TEST = 320
    return cfg


def _image():
    data = json.loads((COCO / "annotations" / "instances_val2017.json").read_text())
    info = sorted(data["images"], key=lambda i: i["id"])[0]
    img = cv2.cvtColor(cv2.imread(str(COCO / "images" / info["file_name"])), cv2.COLOR_BGR2RGB)
    anns = [a for a in data["annotations"] if a["image_id"] == info["id"] and a["bbox"][2] > 20 and a["bbox"][3] > 20]
    boxes = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                      for a in anns[:2]], dtype=np.float32)
    assert len(boxes) == 2
    return img, boxes


@pytest.fixture(scope="module")
def version_dir(tmp_path_factory):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    import sim_model.modeling  # noqa: F401

    torch.manual_seed(0)
    cfg = _cfg()
    model = build_model(cfg).eval()
    # give class 0 ("person") prototypes from this image's features; "dog" and "kite" stay uninitialised
    img, _ = _image()
    feats = model.image_features(torch.as_tensor(img[:200, :300].transpose(2, 0, 1).copy()).float())
    z = F.normalize(feats.mask_features, dim=0).flatten(1).t()
    model.prototypes.update(z, 0, epsilon=0.05, n_iters=3)
    vdir = tmp_path_factory.mktemp("models") / "7" / "v0001"
    vdir.mkdir(parents=True)
    DetectionCheckpointer(model, save_dir=str(vdir)).save("model")
    (vdir / "config.yaml").write_text(cfg.dump())
    (vdir / "classes.json").write_text(json.dumps({"labels": LABELS}))
    return vdir


@pytest.fixture(scope="module")
def engine(version_dir):
    return SIMBoxToMask.from_version_dir(version_dir)


def test_from_version_dir_restores_the_model(engine, version_dir):
    assert engine.model_version == "sim-v0001"
    assert engine.class_names == LABELS
    state = torch.load(version_dir / "model.pth", map_location="cpu", weights_only=False)["model"]
    assert torch.equal(engine.model.prototypes.prototypes, state["prototypes.prototypes"])
    assert engine.model.prototypes.initialized.tolist() == [True, False, False]
    k = next(k for k in state if k.startswith("net.") and state[k].dtype.is_floating_point and state[k].dim() == 4)
    assert torch.equal(engine.model.state_dict()[k], state[k])
    assert (engine.mu, engine.alpha, engine.tau, engine.tau_low, engine.tau_high) == (5.0, 0.5, 1.0, 0.3, 0.7)
    assert not engine.model.training


def test_predict_masks_scores_and_fallbacks(engine, monkeypatch):
    img, boxes = _image()
    h, w = img.shape[:2]
    calls = []
    real = engine.model.image_features
    monkeypatch.setattr(engine.model, "image_features", lambda *a, **k: calls.append(1) or real(*a, **k))
    engine._cache.clear()
    boxes4 = np.concatenate([boxes, boxes])
    labels = ["person", "person", "not-a-class", "dog"]  # known+initialised, unknown, known without prototypes
    masks, scores = engine.predict(img, np.concatenate([boxes[:1], boxes[:1], boxes[:1], boxes[1:]]), labels)
    assert len(calls) == 1  # one network pass for all boxes of the image
    assert masks.shape == (4, h, w) and masks.dtype == np.float32
    assert scores.shape == (4,) and scores.dtype == np.float32
    assert masks.min() >= 0 and masks.max() <= 1 and np.all((scores >= 0) & (scores <= 1))
    for m, b in zip(masks, [boxes[0]] * 3 + [boxes[1]]):
        inside = box_mask((h, w), b)
        assert (m[~inside] == 0).all() and m[inside].max() > 0
    np.testing.assert_array_equal(masks[0], masks[1])  # same box and label, same mask

    # unknown label -> M_I alone; the known class without prototypes gives M_I alone too
    m_i = masks[2]
    masks_dog, _ = engine.predict(img, boxes[:1], ["dog"])
    np.testing.assert_allclose(masks_dog[0], m_i, atol=1e-6)
    # the initialised class is rectified: M̂ = (1 - α) M_S + α M_I, with M_S from the prototypes (Eq. 1, 7)
    assert np.abs(masks[0] - m_i).max() > 1e-3
    assert len(calls) == 1  # the later boxes on the same image reused the cached network pass
    _, feats = engine.image_features(img)
    z = F.normalize(feats.mask_features, dim=0)
    m_s, valid = engine.model.prototypes.semantic_map(z, [0], tau=1.0)
    assert valid.tolist() == [True]
    m_s_img = feats.to_image(m_s, (h, w))[0].numpy()
    inside = box_mask((h, w), boxes[0])
    np.testing.assert_allclose(masks[0][inside], (0.5 * m_s_img + 0.5 * m_i)[inside], atol=1e-5)

    # S_k is the mean of the mask over its pixels >= τ_high (Eq. 11)
    for m, s in zip(masks, scores):
        fg = m >= 0.7
        assert s == pytest.approx(float(m[fg].mean()) if fg.any() else 0.0, abs=1e-5)

    # boxes are independent: predicting one alone gives the same mask as in the batch
    alone, alone_s = engine.predict(img, boxes[1:], ["dog"])
    np.testing.assert_allclose(alone[0], masks[3], atol=1e-6)
    assert alone_s[0] == pytest.approx(scores[3], abs=1e-6)
    # without the cache: same result, one network pass per call; another image is a cache miss
    engine.feature_cache_size = 0
    try:
        again, _ = engine.predict(img, boxes[1:], ["dog"])
    finally:
        engine.feature_cache_size = 4
    np.testing.assert_allclose(again[0], masks[3], atol=1e-6)
    assert len(calls) == 2
    engine.predict(np.ascontiguousarray(img[::-1]), boxes[1:], ["dog"])
    assert len(calls) == 3


def test_predict_bad_input_and_empty(engine):
    img, boxes = _image()
    masks, scores = engine.predict(img, np.zeros((0, 4), np.float32), [])
    assert masks.shape == (0,) + img.shape[:2] and scores.shape == (0,)
    with pytest.raises(BoxToMaskError):
        engine.predict(img, boxes, ["person"])  # length mismatch
    with pytest.raises(BoxToMaskError):
        engine.predict(img[:, :, 0], boxes, ["person", "dog"])


def _copy_version(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in ("model.pth", "config.yaml", "classes.json"):
        (dst / f).write_bytes((src / f).read_bytes())
    return dst


def test_from_version_dir_errors(version_dir, tmp_path):
    with pytest.raises(ModelVersionError, match="does not exist"):
        SIMBoxToMask.from_version_dir(tmp_path / "nope")
    d = _copy_version(version_dir, tmp_path / "missing")
    (d / "model.pth").unlink()
    with pytest.raises(ModelVersionError, match="lacks model.pth"):
        SIMBoxToMask.from_version_dir(d)
    d = _copy_version(version_dir, tmp_path / "truncated")
    (d / "model.pth").write_bytes((version_dir / "model.pth").read_bytes()[:1000])
    with pytest.raises(ModelVersionError, match="cannot load the checkpoint"):
        SIMBoxToMask.from_version_dir(d)
    d = _copy_version(version_dir, tmp_path / "foreign")
    torch.save({"model": {"conv.weight": torch.zeros(3)}}, d / "model.pth")
    with pytest.raises(ModelVersionError, match="does not hold this model's weights"):
        SIMBoxToMask.from_version_dir(d)
    d = _copy_version(version_dir, tmp_path / "classes")
    (d / "classes.json").write_text('{"labels": ["a", ')
    with pytest.raises(ModelVersionError, match="classes.json"):
        SIMBoxToMask.from_version_dir(d)
    d = _copy_version(version_dir, tmp_path / "classes2")
    (d / "classes.json").write_text(json.dumps({"labels": ["a", "b", "c", "d"]}))
    with pytest.raises(ModelVersionError, match="4 class names but the model has 3"):
        SIMBoxToMask.from_version_dir(d)
    d = _copy_version(version_dir, tmp_path / "config")
    (d / "config.yaml").write_text("MODEL:\n  NOT_A_KEY: 1\n")
    with pytest.raises(ModelVersionError, match="not a valid SIM config"):
        SIMBoxToMask.from_version_dir(d)
