"""MISA through the real training loop on real images: the BSSS teacher trains with ``training.train``, a MISA
instance network trains against it and resumes with the same teacher; the semantic evaluator on balloon."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from sim_model.datasets import REPO_ROOT, shared_data_dir
from tests.support import COCO_TRAIN_IMAGES, COCO_TRAIN_JSON
from training.train import Trainer, build_config, train

REPO = str(REPO_ROOT)
SMALL = ["MODEL.DEVICE", "cpu", "DATASETS.TEST", "()", "INPUT.MIN_SIZE_TRAIN", "(160,)", "INPUT.MAX_SIZE_TRAIN", "224",
         "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0", "SOLVER.WARMUP_ITERS", "1",
         "SOLVER.CHECKPOINT_PERIOD", "1", "MODEL.BOXINST.PAIRWISE.WARMUP_ITERS", "1", "SEED", "3"]

pytestmark = pytest.mark.skipif(not COCO_TRAIN_JSON.exists(), reason="coco-mini data not available")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("bsss")
    cfg = build_config(os.path.join(REPO, "configs", "BSSS_EffLite0_FPN_cpu.yaml"),
                       SMALL + ["OUTPUT_DIR", str(out), "SOLVER.MAX_ITER", "2"],
                       train_json=str(COCO_TRAIN_JSON), train_images=str(COCO_TRAIN_IMAGES))
    result = train(cfg)
    assert result["iterations"] == 2
    losses = result["last_losses"]
    assert {"loss_sem_prj", "loss_sem_pairwise", "loss_sem_unary"} <= set(losses)
    assert all(np.isfinite(v) for v in losses.values())
    return out / "config.yaml", out / "model_final.pth"


def _misa_cfg(out, teacher, max_iter, *extra):
    return build_config(os.path.join(REPO, "configs", "MISA_EffLite0_FPN_cpu.yaml"),
                        SMALL + ["OUTPUT_DIR", str(out), "SOLVER.MAX_ITER", str(max_iter),
                                 "MODEL.MISA.TEACHER.CONFIG", str(teacher[0]),
                                 "MODEL.MISA.TEACHER.WEIGHTS", str(teacher[1]), *extra],
                        train_json=str(COCO_TRAIN_JSON), train_images=str(COCO_TRAIN_IMAGES))


def test_misa_trains_against_the_teacher_and_resumes_with_it(teacher, tmp_path, monkeypatch):
    import sim_model.condinst as condinst

    calls = {"sepa": 0, "with_pairwise": []}
    real_sepa, real_boxinst = condinst.sepa_pseudo_labels, condinst.boxinst_losses

    def sepa_spy(*a, **kw):
        calls["sepa"] += 1
        return real_sepa(*a, **kw)

    def boxinst_spy(*a, with_pairwise=True, **kw):
        calls["with_pairwise"].append(with_pairwise)
        return real_boxinst(*a, with_pairwise=with_pairwise, **kw)

    monkeypatch.setattr(condinst, "sepa_pseudo_labels", sepa_spy)
    monkeypatch.setattr(condinst, "boxinst_losses", boxinst_spy)
    t1 = Trainer(_misa_cfg(tmp_path, teacher, 2))
    t1.resume_or_load(resume=False)
    t1.train()
    m1 = t1.model
    assert m1.semantic_teacher() is m1._semantic_teacher  # loaded once, kept
    assert not any(k.startswith("_semantic_teacher") for k in m1.state_dict())  # not checkpointed
    assert any(k.startswith("fsd_projector.") for k in m1.state_dict())
    hist = t1.storage.histories()
    assert "loss_fsd" in hist and np.isfinite(hist["loss_fsd"].latest()) and hist["loss_fsd"].latest() > 0
    # SEPA's L1 term replaced BoxInst's pairwise term (same name, loss_pairwise) at every step
    assert calls["sepa"] == 2 and calls["with_pairwise"] == [False, False] and "loss_pairwise" in hist
    # the teacher is frozen: no parameter trains, its weights are those of its checkpoint after training
    st = m1.semantic_teacher()
    assert not st.training and not any(p.requires_grad for p in st.parameters())
    saved = torch.load(teacher[1], map_location="cpu", weights_only=False)["model"]
    assert torch.equal(st.state_dict()["classifier.weight"], saved["classifier.weight"])

    # resume from the run's own config: same teacher, the projector's state restored
    t2 = Trainer(_misa_cfg(tmp_path, teacher, 3))
    t2.resume_or_load(resume=True)
    assert t2.start_iter == 2
    assert t2.cfg.MODEL.MISA.TEACHER.WEIGHTS == str(teacher[1])
    for k, v in m1.state_dict().items():
        if k.startswith("fsd_projector."):
            assert torch.equal(v, t2.model.state_dict()[k]), k
    t2.train()
    assert int(t2.model.iteration) == 3
    assert t2.model.semantic_teacher().num_classes == 80


def test_misa_without_a_teacher_fails_with_a_clear_error(tmp_path):
    t = Trainer(_misa_cfg(tmp_path, (tmp_path / "none.yaml", tmp_path / "none.pth"), 1))
    t.resume_or_load(resume=False)
    with pytest.raises(FileNotFoundError, match="MODEL.MISA.TEACHER.CONFIG"):
        t.train()


def test_semantic_evaluator_on_balloon_val():
    from detectron2.data import MetadataCatalog  # noqa: F401  (registration below)
    from pycocotools.coco import COCO

    from sim_model.misa.bsss import SemanticMIoUEvaluator
    from training.data import register_coco

    split = shared_data_dir() / "balloon" / "val"
    if not split.is_dir():
        pytest.skip("balloon not available")
    json_file = split / "annotations" / "instances_val.json"
    name = register_coco("test_balloon_val_sem", str(json_file), str(split / "images"))
    ev = SemanticMIoUEvaluator(name)
    coco = COCO(str(json_file))
    img_id = sorted(coco.getImgIds())[0]
    gt = ev.ground_truth(img_id)
    union = np.zeros_like(gt, dtype=bool)
    for a in coco.loadAnns(coco.getAnnIds(imgIds=img_id)):
        union |= coco.annToMask(a) > 0
    assert np.array_equal(gt == 0, union) and np.array_equal(gt == 1, ~union)  # balloon = 0, background = 1
    perfect = torch.nn.functional.one_hot(torch.from_numpy(gt), 2).permute(2, 0, 1).float()
    ev.process([{"image_id": img_id}], [{"sem_seg": perfect}])
    assert ev.evaluate()["sem_seg"]["mIoU"] == pytest.approx(100.0)
    ev.reset()
    ev.process([{"image_id": img_id}], [{"sem_seg": torch.stack([torch.zeros_like(perfect[0]),
                                                                   torch.ones_like(perfect[0])])}])
    r = ev.evaluate()["sem_seg"]
    assert r["mIoU_fg"] == 0.0 and r["IoU-background"] == pytest.approx(100 * (~union).mean())


def test_a_versions_relative_teacher_files_resolve_beside_its_config(tmp_path):
    """A version's config.yaml names bsss_config.yaml / bsss_model.pth beside it (training.publish)."""
    (tmp_path / "bsss_config.yaml").write_text("MODEL:\n  META_ARCHITECTURE: BoxSemSeg\n")
    (tmp_path / "bsss_model.pth").write_bytes(b"")
    (tmp_path / "config.yaml").write_text(
        f"_BASE_: {REPO}/configs/MISA_EffLite0_FPN_cpu.yaml\nMODEL:\n  MISA:\n    TEACHER:\n"
        "      CONFIG: bsss_config.yaml\n      WEIGHTS: bsss_model.pth\n")
    cfg = build_config(str(tmp_path / "config.yaml"))
    assert cfg.MODEL.MISA.TEACHER.CONFIG == str(tmp_path / "bsss_config.yaml")
    assert cfg.MODEL.MISA.TEACHER.WEIGHTS == str(tmp_path / "bsss_model.pth")


def test_switching_misa_or_its_projector_shape_starts_a_new_schedule(tmp_path):
    from training.retrain import _misa_changed

    parent = os.path.join(REPO, "configs", "SIM_close_EffLite0_FPN_cpu.yaml")
    assert not _misa_changed(parent, parent, [])
    assert _misa_changed(parent, parent, ["MODEL.MISA.ENABLED", "True"])
    misa = os.path.join(REPO, "configs", "MISA_EffLite0_FPN_cpu.yaml")
    assert not _misa_changed(misa, misa, ["MODEL.MISA.SEPA.ENABLED", "False"])  # SEPA has no parameters
    assert _misa_changed(misa, misa, ["MODEL.BSSS.FEATURE_DIM", "32"])
    assert _misa_changed(misa, misa, ["MODEL.MISA.FSD.ENABLED", "False"])
