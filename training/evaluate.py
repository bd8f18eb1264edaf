"""Evaluate a trained CondInst/BoxInst/SIM checkpoint on a COCO-format dataset with masks.

Command line::

    python -m training.evaluate --config output/SIM_EffLite0_FPN_cpu/config.yaml \\
        --weights output/SIM_EffLite0_FPN_cpu/model_final.pth \\
        [--json J --images D] [--max-images N] [--skip-instance-seg] [--skip-box-to-mask] \\
        [--output metrics.json] [KEY VALUE ...]

Reports
(a) ``instance_segmentation``: COCO bbox and mask (segm) AP of the free-running instance segmenter
    (detectron2's ``COCOEvaluator``, AP in percent), and
(b) ``box_to_mask``: mIoU and mask AP when the ground-truth boxes are given, through the SIM box→mask
    predictor (``sim_model.engines.sim.SIMBoxToMask``) scored by
    ``sim_model.evaluation.evaluate_box_to_mask`` (see there for the figures' definitions).
Without ``--json/--images`` the first dataset of ``DATASETS.TEST`` is used.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Optional, Sequence

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import MetadataCatalog
from detectron2.evaluation import COCOEvaluator, inference_on_dataset
from detectron2.modeling import build_model
from detectron2.utils.logger import setup_logger

from sim_model.engines.sim import SIMBoxToMask
from sim_model.evaluation import evaluate_box_to_mask
from training.data import dataset_classes, register_coco
from training.train import Trainer, build_config, dataset_name, plain

logger = logging.getLogger("training.evaluate")


def load_model(cfg, weights: str) -> torch.nn.Module:
    """Build the model of ``cfg`` and load ``weights`` (a detectron2 checkpoint); eval mode.

    Raises:
        FileNotFoundError: ``weights`` does not exist.
    """
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"checkpoint not found: {weights}")
    model = build_model(cfg)
    DetectionCheckpointer(model).load(weights)
    return model.eval()


def evaluate_instance_segmentation(cfg, model, dataset_name: str, output_dir: Optional[str] = None) -> dict:
    """COCO bbox + segm AP (percent) of the free-running segmenter on a registered dataset."""
    loader = Trainer.build_test_loader(cfg, dataset_name)
    evaluator = COCOEvaluator(dataset_name, tasks=("bbox", "segm"), distributed=False, output_dir=output_dir)
    t0 = time.time()
    res = inference_on_dataset(model, loader, evaluator)
    out = plain(dict(res))
    out["seconds"] = time.time() - t0
    return out


def evaluate_box_to_mask_sim(cfg, model, dataset_name: str, max_images: Optional[int] = None) -> dict:
    """Box→mask mIoU / AP given the ground-truth boxes, with the SIM predictor on this model."""
    meta = MetadataCatalog.get(dataset_name)
    engine = SIMBoxToMask(model, cfg, dataset_classes(dataset_name), model_version="evaluate")
    res = evaluate_box_to_mask(engine, meta.json_file, meta.image_root, max_images=max_images, progress=False)
    return {k: v for k, v in res.items() if k not in ("per_box",)}


def load_eval_model(config_file: str, weights: str, opts: Sequence[str] = ()):
    """``(cfg, model)`` for evaluation: the config with ``opts``, every weight from the checkpoint ``weights``
    (no ImageNet initialisation), model in eval mode on ``MODEL.DEVICE``."""
    opts = list(opts) + ["MODEL.WEIGHTS", ""]
    if "EFFICIENTNET_LITE.PRETRAINED" not in " ".join(opts):
        opts += ["MODEL.EFFICIENTNET_LITE.PRETRAINED", "False"]  # every weight comes from the checkpoint
    cfg = build_config(config_file, opts)
    return cfg, load_model(cfg, weights)


def evaluate(config_file: str, weights: str, json_file: Optional[str] = None, image_dir: Optional[str] = None,
             opts: Sequence[str] = (), max_images: Optional[int] = None, instance_seg: bool = True,
             box_to_mask: bool = True, output_dir: Optional[str] = None) -> dict:
    """Both evaluations of the module docstring; returns ``{"instance_segmentation": …, "box_to_mask": …}``."""
    cfg, model = load_eval_model(config_file, weights, opts)
    if json_file is not None or image_dir is not None:
        if json_file is None or image_dir is None:
            raise ValueError("give both --json and --images")
        name = register_coco(dataset_name("eval", json_file, image_dir), json_file, image_dir)
    elif cfg.DATASETS.TEST:
        name = cfg.DATASETS.TEST[0]
    else:
        raise ValueError("no dataset: give --json and --images, or set DATASETS.TEST")
    out = {"dataset": name, "weights": os.path.abspath(weights), "config": os.path.abspath(config_file)}
    if instance_seg:
        out["instance_segmentation"] = evaluate_instance_segmentation(cfg, model, name, output_dir)
    if box_to_mask:
        out["box_to_mask"] = evaluate_box_to_mask_sim(cfg, model, name, max_images)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m training.evaluate``: run :func:`evaluate`, print the figures as JSON (without
    the per-box lists) and, with ``--output``, write them all there.

    Args:
        argv: the arguments (None: ``sys.argv[1:]``).

    Returns:
        0 when the evaluation ran.

    Raises:
        SystemExit: status 2 on a usage error (``--config`` and ``--weights`` are required).
        FileNotFoundError: the config, the checkpoint or the dataset does not exist.
        ValueError: only one of ``--json``/``--images``, or no dataset at all.
    """
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="config yaml (the run's OUTPUT_DIR/config.yaml or configs/…)")
    p.add_argument("--weights", required=True, help="checkpoint (.pth) written by training.train")
    p.add_argument("--json", dest="json_file", help="COCO-format json with masks")
    p.add_argument("--images", dest="image_dir", help="image folder of that json")
    p.add_argument("--max-images", type=int, default=None, help="box→mask on the first N images only")
    p.add_argument("--skip-instance-seg", action="store_true", help="skip (a), the COCO mask AP")
    p.add_argument("--skip-box-to-mask", action="store_true", help="skip (b), the box→mask figures")
    p.add_argument("--output", help="write the results as JSON here")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = p.parse_args(argv)
    setup_logger(name="detectron2")
    setup_logger(name="training")
    res = evaluate(args.config, args.weights, args.json_file, args.image_dir, args.opts, args.max_images,
                   instance_seg=not args.skip_instance_seg, box_to_mask=not args.skip_box_to_mask,
                   output_dir=os.path.dirname(args.output) if args.output else None)
    summary = dict(res)
    if "box_to_mask" in summary:
        summary["box_to_mask"] = {k: v for k, v in summary["box_to_mask"].items() if k != "skipped"}
    text = json.dumps(summary, indent=2, default=str)
    print(text)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
