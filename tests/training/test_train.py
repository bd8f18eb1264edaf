"""training.train / training.evaluate on real coco-mini data: the command lines, the Python API and a
short real training whose losses fall."""
import json
import os
import subprocess
import sys

import pytest
import torch

from sim_model.datasets import REPO_ROOT, coco_mini_dir
from sim_model.engines.sim import SIMBoxToMask
from sim_model.evaluation import evaluate_box_to_mask
from tests.support import COCO_TRAIN_IMAGES, COCO_TRAIN_JSON, COCO_VAL_IMAGES, COCO_VAL_JSON
from training.data import dataset_classes, register_coco
from training.evaluate import load_eval_model

REPO = str(REPO_ROOT)
TRAIN_JSON, TRAIN_IMAGES = str(COCO_TRAIN_JSON), str(COCO_TRAIN_IMAGES)
VAL_JSON, VAL_IMAGES = str(COCO_VAL_JSON), str(COCO_VAL_IMAGES)
TINY = ["INPUT.MIN_SIZE_TRAIN", "(160,)", "INPUT.MAX_SIZE_TRAIN", "224", "INPUT.MIN_SIZE_TEST", "160",
        "INPUT.MAX_SIZE_TEST", "224", "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0",
        "SOLVER.WARMUP_ITERS", "1"]

# one torch thread per process: the CI box has 2 shared cores (see training.train --threads)
ENV = dict(os.environ, OMP_NUM_THREADS="1")

pytestmark = pytest.mark.skipif(not coco_mini_dir().is_dir(), reason="coco-mini data not available")


def subset_json(src: str, dst, n_images: int) -> str:
    """A COCO json with the first ``n_images`` images of ``src`` (all categories kept)."""
    with open(src) as f:
        d = json.load(f)
    ids = {im["id"] for im in sorted(d["images"], key=lambda im: im["id"])[:n_images]}
    d["images"] = [im for im in d["images"] if im["id"] in ids]
    d["annotations"] = [a for a in d["annotations"] if a["image_id"] in ids]
    with open(dst, "w") as f:
        json.dump(d, f)
    return str(dst)


def _metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_train_and_evaluate_command_lines(tmp_path):
    out = tmp_path / "run"
    val = subset_json(VAL_JSON, tmp_path / "val3.json", 3)
    cmd = [sys.executable, "-m", "training.train", "--config", os.path.join(REPO, "configs/SIM_EffLite0_FPN_cpu.yaml"),
           "--train-json", TRAIN_JSON, "--train-images", TRAIN_IMAGES, "--val-json", val, "--val-images", VAL_IMAGES,
           "SOLVER.MAX_ITER", "2", "MODEL.SIM.WARMUP_ITERS", "1", "OUTPUT_DIR", str(out), *TINY]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "model_final.pth").is_file() and (out / "config.yaml").is_file()
    rows = _metrics(out / "metrics.json")
    assert any("loss_pseudo" in row and "loss_paste" in row and "loss_prj" in row for row in rows)
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(out))
    result = json.loads((out / "train_result.json").read_text())
    assert result["final_checkpoint"].endswith("model_final.pth") and result["iterations"] == 2
    assert "segm" in result["metrics"] and "AP" in result["metrics"]["segm"]
    assert "iter: 1" in r.stderr + r.stdout  # detectron2's progress line

    ev_out = tmp_path / "eval.json"
    cmd = [sys.executable, "-m", "training.evaluate", "--config", str(out / "config.yaml"), "--weights",
           str(out / "model_final.pth"), "--json", val, "--images", VAL_IMAGES, "--output", str(ev_out),
           "MODEL.FCOS.INFERENCE_TH_TEST", "0.0"]  # an untrained head scores below the default 0.05
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    ev = json.loads(ev_out.read_text())
    assert {"AP", "AP50", "APs"} <= set(ev["instance_segmentation"]["segm"])
    b2m = ev["box_to_mask"]
    assert b2m["n_images"] == 3 and b2m["n_boxes"] > 0
    # the command evaluated the trained weights: its box→mask figures are those of the SIM engine built
    # from model_final.pth
    cfg, model = load_eval_model(str(out / "config.yaml"), str(out / "model_final.pth"))
    name = register_coco("test_train_val3", val, VAL_IMAGES)
    direct = evaluate_box_to_mask(SIMBoxToMask(model, cfg, dataset_classes(name), "direct"), val, VAL_IMAGES,
                                  progress=False)
    assert b2m["mIoU"] == pytest.approx(direct["mIoU"], abs=1e-6) and b2m["AP"] == pytest.approx(direct["AP"])
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)
    assert final["iteration"] == 1 and int(final["model"]["iteration"]) == 2  # two steps were taken


def test_build_config_sets_classes_from_the_json(tmp_path):
    from training.train import build_config

    j = tmp_path / "two.json"
    with open(TRAIN_JSON) as f:
        d = json.load(f)
    d["categories"] = d["categories"][:2]
    keep = {c["id"] for c in d["categories"]}
    d["annotations"] = [a for a in d["annotations"] if a["category_id"] in keep]
    j.write_text(json.dumps(d))
    cfg = build_config(os.path.join(REPO, "configs/BoxInst_EffLite0_FPN_cpu.yaml"), ["SOLVER.MAX_ITER", "7"],
                       train_json=str(j), train_images=TRAIN_IMAGES)
    assert cfg.MODEL.FCOS.NUM_CLASSES == 2 and cfg.SOLVER.MAX_ITER == 7
    assert cfg.DATASETS.TRAIN[0].startswith("train_")
    with pytest.raises(ValueError):
        build_config(os.path.join(REPO, "configs/BoxInst_EffLite0_FPN_cpu.yaml"), train_json=str(j))


@pytest.mark.slow
def test_short_real_training_losses_fall(tmp_path):
    from training.train import build_config, train

    sub = subset_json(TRAIN_JSON, tmp_path / "train8.json", 8)
    cfg = build_config(os.path.join(REPO, "configs/BoxInst_EffLite0_FPN_cpu.yaml"),
                       TINY + ["SOLVER.MAX_ITER", "60", "SOLVER.BASE_LR", "0.01", "SOLVER.STEPS", "(1000,)",
                               "SOLVER.CHECKPOINT_PERIOD", "1000",
                               "OUTPUT_DIR", str(tmp_path / "run"), "DATASETS.TEST", "()", "SEED", "5"],
                       train_json=sub, train_images=TRAIN_IMAGES)
    result = train(cfg, resume=False)
    assert os.path.isfile(result["final_checkpoint"])
    rows = [r for r in _metrics(tmp_path / "run" / "metrics.json") if "total_loss" in r]
    first, last = rows[0], rows[-1]
    # metrics.json holds medians over the last 20 iterations, written every 20 iterations
    assert last["iteration"] >= 59
    for key in ("total_loss", "loss_fcos_cls", "loss_prj"):
        assert last[key] < first[key], (key, first[key], last[key])
