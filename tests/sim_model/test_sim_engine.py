"""SIMBoxToMask: a real model version (one SIM training iteration, CPU config, small test resolution)
on a real coco-mini image — loading, shapes, ranges, box restriction, rectification, the unknown-label fallback,
one network pass per image, and clear errors for broken version directories."""
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sim_model.benchmark import default_data_dir
from sim_model.box_to_mask import BoxToMaskError
from sim_model.engines.shape_prior import box_mask
from sim_model.engines.sim import ModelVersionError, SIMBoxToMask

DATA = default_data_dir()
COCO = DATA / "val2017"
TRAIN_JSON = DATA / "train2017" / "annotations" / "instances_train2017.json"
pytestmark = pytest.mark.skipif(not TRAIN_JSON.exists() or not COCO.exists(), reason=f"coco-mini not found at {DATA}")


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
    """A model version from one real SIM training iteration (CPU config, coco-mini train2017, warm-up 0,
    so the checkpoint holds the teacher and prototypes), laid out like training.registry's versions."""
    from training.train import build_config, train

    run = tmp_path_factory.mktemp("run")
    cfg = build_config("configs/SIM_EffLite0_FPN_cpu.yaml", [
        "OUTPUT_DIR", str(run), "DATASETS.TEST", "()", "SOLVER.MAX_ITER", "1", "SOLVER.IMS_PER_BATCH", "1",
        "MODEL.SIM.WARMUP_ITERS", "0", "MODEL.SIM.PROTOTYPES.INPUT_THRESH", "0.0",
        "INPUT.MIN_SIZE_TRAIN", "(256,)", "INPUT.MAX_SIZE_TRAIN", "400", "INPUT.MIN_SIZE_TEST", "256",
        "INPUT.MAX_SIZE_TEST", "400", "DATALOADER.NUM_WORKERS", "0"],
        train_json=str(TRAIN_JSON), train_images=str(DATA / "train2017" / "images"))
    assert cfg.MODEL.FCOS.NUM_CLASSES == 80
    result = train(cfg)
    vdir = tmp_path_factory.mktemp("models") / "7" / "v0001"
    vdir.mkdir(parents=True)
    shutil.copyfile(result["final_checkpoint"], vdir / "model.pth")
    shutil.copyfile(run / "config.yaml", vdir / "config.yaml")
    cats = sorted(json.loads(TRAIN_JSON.read_text())["categories"], key=lambda c: c["id"])
    (vdir / "classes.json").write_text(json.dumps({"labels": [c["name"] for c in cats]}))
    return vdir


@pytest.fixture(scope="module")
def engine(version_dir):
    return SIMBoxToMask.from_version_dir(version_dir)


def _labels(engine):
    """(a label with prototypes, a known label without prototypes)."""
    init = engine.model.prototypes.initialized.tolist()
    assert any(init) and not all(init)
    return engine.class_names[init.index(True)], engine.class_names[init.index(False)]


def test_from_version_dir_restores_the_model(engine, version_dir):
    assert engine.model_version == "sim-v0001"
    assert len(engine.class_names) == 80 and engine.class_names[0] == "person"
    state = torch.load(version_dir / "model.pth", map_location="cpu", weights_only=False)["model"]
    assert torch.equal(engine.model.prototypes.prototypes, state["prototypes.prototypes"])
    assert torch.equal(engine.model.prototypes.initialized, state["prototypes.initialized"])
    assert engine.model.teacher is not None  # the teacher makes the pseudo masks, as in training
    for prefix in ("net.", "teacher.model."):
        k = next(k for k in state if k.startswith(prefix) and state[k].dtype.is_floating_point and state[k].dim() == 4)
        assert torch.equal(engine.model.state_dict()[k], state[k])
    assert (engine.mu, engine.alpha, engine.tau, engine.tau_low, engine.tau_high) == (5.0, 0.5, 1.0, 0.3, 0.7)
    assert list(engine.resize.short_edge_length) == [256, 256]  # INPUT.MIN_SIZE_TEST from config.yaml
    assert not engine.model.training


def test_predict_masks_scores_and_fallbacks(engine, monkeypatch):
    img, boxes = _image()
    h, w = img.shape[:2]
    with_protos, without_protos = _labels(engine)
    calls = []
    real = engine.model.image_features
    monkeypatch.setattr(engine.model, "image_features", lambda *a, **k: calls.append(1) or real(*a, **k))
    engine._cache.clear()
    # known label with prototypes (twice), an unknown label, a known label without prototypes
    labels = [with_protos, with_protos, "not-a-class", without_protos]
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
    masks_np, _ = engine.predict(img, boxes[:1], [without_protos])
    np.testing.assert_allclose(masks_np[0], m_i, atol=1e-6)
    assert len(calls) == 1  # the later boxes on the same image reused the cached network pass
    # the class with prototypes is rectified: M̂ = (1 - α) M_S + α M_I, M_S from its prototypes (Eq. 1, 7)
    assert np.abs(masks[0] - m_i).max() > 1e-3
    _, feats = engine.image_features(img)
    assert feats.net is engine.model.teacher.model
    z = F.normalize(feats.mask_features, dim=0)
    m_s, valid = engine.model.prototypes.semantic_map(z, [engine.class_names.index(with_protos)], tau=1.0)
    assert valid.tolist() == [True]
    m_s_img = feats.to_image(m_s, (h, w))[0].numpy()
    inside = box_mask((h, w), boxes[0])
    np.testing.assert_allclose(masks[0][inside], (0.5 * m_s_img + 0.5 * m_i)[inside], atol=1e-5)

    # S_k is the mean of the mask over its pixels >= τ_high (Eq. 11)
    for m, s in zip(masks, scores):
        fg = m >= 0.7
        assert s == pytest.approx(float(m[fg].mean()) if fg.any() else 0.0, abs=1e-5)

    # boxes are independent: predicting one alone gives the same mask as in the batch
    alone, alone_s = engine.predict(img, boxes[1:], [without_protos])
    np.testing.assert_allclose(alone[0], masks[3], atol=1e-6)
    assert alone_s[0] == pytest.approx(scores[3], abs=1e-6)
    # without the cache: same result, one network pass per call; another image is a cache miss
    engine.feature_cache_size = 0
    try:
        again, _ = engine.predict(img, boxes[1:], [without_protos])
    finally:
        engine.feature_cache_size = 4
    np.testing.assert_allclose(again[0], masks[3], atol=1e-6)
    assert len(calls) == 2
    engine.predict(np.ascontiguousarray(img[::-1]), boxes[1:], [without_protos])
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
    (d / "classes.json").write_text(json.dumps({"labels": [f"c{i}" for i in range(81)]}))
    with pytest.raises(ModelVersionError, match="81 class names but the model has 80"):
        SIMBoxToMask.from_version_dir(d)
    d = _copy_version(version_dir, tmp_path / "config")
    (d / "config.yaml").write_text("MODEL:\n  NOT_A_KEY: 1\n")
    with pytest.raises(ModelVersionError, match="not a valid SIM config"):
        SIMBoxToMask.from_version_dir(d)
