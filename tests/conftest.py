"""Fixtures shared by the test packages (plain helpers are in ``tests/support.py``).

- ``sim_version_dir`` (session): a real model version directory, laid out like the registry's
  (``model.pth``, ``config.yaml``, ``classes.json``), from one real SIM training iteration on coco-mini
  train2017 (CPU config, small resolution, warm-up 0 so the checkpoint holds the teacher and the
  prototypes of the classes of the first image).
"""
from __future__ import annotations

import json
import shutil

import pytest

from tests.support import COCO_TRAIN_IMAGES, COCO_TRAIN_JSON


@pytest.fixture(scope="session")
def sim_version_dir(tmp_path_factory):
    if not COCO_TRAIN_JSON.exists():
        pytest.skip(f"coco-mini not found at {COCO_TRAIN_JSON.parent.parent}")
    from training.train import build_config, train  # the training package, only for the tests that need it

    run = tmp_path_factory.mktemp("run")
    cfg = build_config("configs/SIM_EffLite0_FPN_cpu.yaml", [
        "OUTPUT_DIR", str(run), "DATASETS.TEST", "()", "SOLVER.MAX_ITER", "1", "SOLVER.IMS_PER_BATCH", "1",
        "MODEL.SIM.WARMUP_ITERS", "0", "MODEL.SIM.PROTOTYPES.INPUT_THRESH", "0.0",
        "INPUT.MIN_SIZE_TRAIN", "(256,)", "INPUT.MAX_SIZE_TRAIN", "400", "INPUT.MIN_SIZE_TEST", "256",
        "INPUT.MAX_SIZE_TEST", "400", "DATALOADER.NUM_WORKERS", "0"],
        train_json=str(COCO_TRAIN_JSON), train_images=str(COCO_TRAIN_IMAGES))
    assert cfg.MODEL.FCOS.NUM_CLASSES == 80
    result = train(cfg)
    vdir = tmp_path_factory.mktemp("models") / "7" / "v0001"
    vdir.mkdir(parents=True)
    shutil.copyfile(result["final_checkpoint"], vdir / "model.pth")
    shutil.copyfile(run / "config.yaml", vdir / "config.yaml")
    cats = sorted(json.loads(COCO_TRAIN_JSON.read_text())["categories"], key=lambda c: c["id"])
    (vdir / "classes.json").write_text(json.dumps({"labels": [c["name"] for c in cats]}))
    return vdir
