"""SIM's Table-3 ladder on coco-mini: BoxInst → + pseudo loss → + copy-paste, same schedule and seed.

Command line (from the repository root; ~25 min per rung on one CPU core)::

    python -m training.ladder [--out output/ladder] [--rungs boxinst,sim_pseudo,sim_full] [--skip-train]
                              [--no-write]

For each rung it trains ``configs/<rung config>`` on coco-mini train2017 (``training.train``, one torch
thread: on a shared 2-core machine two OpenMP threads are several times slower), then scores it on
val2017 and records one row per rung in docs/benchmarks.json / .md through
:func:`sim_model.results.record_results`:

- ``mask_AP`` / ``box_AP``: COCO segm / bbox AP (percent) of the free-running instance segmenter,
  from the evaluation at the end of training (detectron2's ``COCOEvaluator``);
- ``mIoU*``, ``AP*``, ``ms_per_box``, ``ms_per_image``: box→mask given the ground-truth boxes through the
  SIM predictor (:func:`training.evaluate.evaluate`, :func:`sim_model.evaluation.evaluate_box_to_mask`);
- ``train_step_s``: median seconds per training step after the SIM gate (``MODEL.SIM.WARMUP_ITERS``;
  all steps for BoxInst), from detectron2's ``metrics.json``;
- ``ms_first_box`` / ``ms_per_extra_box``: predictor time for one box on an image (network pass included)
  and the marginal time of each further box on the same image (best of 3 calls each, feature cache off),
  medians over the first 10 val2017 images with ≥ 4 boxes.

``--skip-train`` reuses ``<out>/<rung>/model_final.pth``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from detectron2.config import CfgNode
from PIL import Image
from pycocotools.coco import COCO

from sim_model.boxes import xywh_to_xyxy
from sim_model.datasets import coco_mini_dir, split_files
from sim_model.engines.sim import SIMBoxToMask
from sim_model.results import record_results
from training.evaluate import evaluate, load_eval_model

RUNGS = {
    "boxinst": "configs/BoxInst_EffLite0_FPN_cpu.yaml",
    "sim_pseudo": "configs/SIM_pseudo_EffLite0_FPN_cpu.yaml",
    "sim_full": "configs/SIM_EffLite0_FPN_cpu.yaml",
}
DATASET = "coco-mini-val2017"


def step_time(metrics_json: Path, after_iter: int) -> float | None:
    """Median ``time`` (s/iteration) of detectron2's metrics.json rows with iteration >= ``after_iter``."""
    times = []
    for line in metrics_json.read_text().splitlines():
        row = json.loads(line)
        if "time" in row and row.get("iteration", -1) >= after_iter:
            times.append(row["time"])
    return statistics.median(times) if times else None


def _best_of(n: int, fn) -> float:
    """Smallest wall-clock seconds of ``n`` calls of ``fn`` (the least disturbed by other load)."""
    best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def extra_box_time(config: Path, weights: Path, json_file: Path, image_dir: Path, n_images: int = 10) -> dict:
    """``ms_first_box`` and ``ms_per_extra_box`` of the SIM predictor (medians over images with >= 4 boxes)."""
    cfg, model = load_eval_model(str(config), str(weights))
    coco = COCO(str(json_file))
    names = [c["name"] for c in coco.loadCats(sorted(coco.getCatIds()))]
    engine = SIMBoxToMask(model, cfg, names, model_version="ladder", feature_cache_size=0)
    first, extra = [], []
    for img_id in sorted(coco.getImgIds()):
        anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=img_id, iscrowd=False)) if a["area"] > 0]
        if len(anns) < 4:
            continue
        image = np.asarray(Image.open(image_dir / coco.loadImgs(img_id)[0]["file_name"]).convert("RGB"))
        boxes = np.array([xywh_to_xyxy(a["bbox"]) for a in anns], np.float32)
        labels = [coco.loadCats(a["category_id"])[0]["name"] for a in anns]
        engine.predict(image, boxes[:1], labels[:1])  # warm-up
        t_one = _best_of(3, lambda: engine.predict(image, boxes[:1], labels[:1]))
        t_all = _best_of(3, lambda: engine.predict(image, boxes, labels))
        first.append(t_one * 1000)
        extra.append((t_all - t_one) * 1000 / (len(anns) - 1))
        if len(first) >= n_images:
            break
    return {"ms_first_box": statistics.median(first), "ms_per_extra_box": statistics.median(extra)}


def run_rung(rung: str, out: Path, skip_train: bool, write: bool) -> dict:
    """Train (unless ``skip_train``), evaluate and record one rung; returns its figures."""
    run_dir = out / rung
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if not (skip_train and (run_dir / "model_final.pth").is_file()):
        cmd = [sys.executable, "-m", "training.train", "--threads", "1", "--config", RUNGS[rung],
               "OUTPUT_DIR", str(run_dir)]
        print("[ladder]", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, env=env)
    cfg = CfgNode.load_yaml_with_base(str(run_dir / "config.yaml"))
    sim = cfg["MODEL"]["SIM"]
    gate = int(sim["WARMUP_ITERS"]) if sim["ENABLED"] else 0
    train_result = json.loads((run_dir / "train_result.json").read_text())
    inst = train_result["metrics"]
    json_file, image_dir = split_files(coco_mini_dir(), "val2017")
    b2m = evaluate(str(run_dir / "config.yaml"), str(run_dir / "model_final.pth"), str(json_file), str(image_dir),
                   instance_seg=False)["box_to_mask"]
    figures = {k: b2m[k] for k in ("mIoU", "mIoU_small", "mIoU_medium", "mIoU_large", "AP", "AP50", "AP75",
                                   "ms_per_box", "ms_per_image")}
    figures.update({
        "mask_AP": inst["segm"]["AP"], "box_AP": inst["bbox"]["AP"],
        "train_step_s": step_time(run_dir / "metrics.json", gate),
        "train_iters": train_result["iterations"],
        **extra_box_time(run_dir / "config.yaml", run_dir / "model_final.pth", json_file, image_dir),
    })
    print(f"[ladder] {rung}: " + json.dumps({k: round(v, 4) if isinstance(v, float) else v
                                              for k, v in figures.items()}), flush=True)
    if write:
        record_results(DATASET, rung, figures, f"python -m training.ladder --rungs {rung}")
    return figures


def main(argv=None) -> int:
    """Entry point of ``python -m training.ladder``: train (unless ``--skip-train`` finds the checkpoint),
    evaluate and record each rung of ``--rungs`` in turn (module docstring).

    Args:
        argv: the arguments (None: ``sys.argv[1:]``).

    Returns:
        0 when every rung ran.

    Raises:
        SystemExit: status 2 on a usage error, e.g. an unknown rung.
        subprocess.CalledProcessError: the training of a rung (``python -m training.train``) failed.
        FileNotFoundError: coco-mini or a rung's output (config.yaml, train_result.json) is missing.
    """
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("output/ladder"))
    p.add_argument("--rungs", default=",".join(RUNGS))
    p.add_argument("--skip-train", action="store_true", help="reuse <out>/<rung>/model_final.pth")
    p.add_argument("--no-write", action="store_true", help="print, do not touch docs/benchmarks.*")
    args = p.parse_args(argv)
    rungs = [r for r in args.rungs.split(",") if r]
    unknown = [r for r in rungs if r not in RUNGS]
    if unknown:
        p.error(f"unknown rungs {unknown}; choose from {list(RUNGS)}")
    for r in rungs:
        run_rung(r, args.out, args.skip_train, not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
