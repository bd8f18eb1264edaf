"""Are SEPA's pseudo labels better than the masks they are propagated from? A table of docs/benchmarks.json.

    .venv/bin/python scripts/benchmark_sepa_labels.py --data ../shared/data/<set> --ladder <ladder out>
        [--weights <model_final.pth>] [--dilations "1,2,4,8,12,24" "1,2"] [--no-write]

MISA's SEPA (Eq. 7–15) trains the mask head towards pseudo labels M̂ propagated from its own masks M, so it
can only help where M̂ is closer to the truth than M. On a val split with ground-truth masks this takes a
trained instance network (default the ladder's BoxInst rung, ``<ladder>/boxinst/model_final.pth``) and the
ladder's BSSS teacher (``<ladder>/bsss``), runs the training forward on each val image at the test size (no
augmentation; the positives the loss would train), and measures the mean IoU with the ground truth, on the
mask grid inside each positive's box, of: the prediction M ≥ 0.5; SEPA's M̂ ≥ 0.5 (colour + β · class-
reweighted teacher features, :func:`sim_model.misa.sepa.sepa_pseudo_labels`); the colour affinity alone
(β = 0, PAMR); the teacher's feature affinity alone. One row per ``--dilations`` variant
(``MODEL.MISA.SEPA.DILATIONS``), in table ``sepa-labels-<dataset>-<val split>``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import detectron2.data.transforms as T  # noqa: E402
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.data import DatasetCatalog, DatasetMapper  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

import sim_model.condinst as condinst  # noqa: E402
from sim_model.misa.sepa import local_affinity, propagate, sepa_affinity, sepa_pseudo_labels  # noqa: E402
from sim_model.modeling.mask_head import aligned_bilinear  # noqa: E402
from sim_model.results import record_results  # noqa: E402
from training.curve import dataset_splits  # noqa: E402
from training.train import build_config  # noqa: E402

LABELS = ("prediction", "sepa", "colour_only", "features_only")


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Per-row IoU of two (P, H, W) bool tensors (0 when both are empty)."""
    inter = (a & b).flatten(1).sum(1).float()
    union = (a | b).flatten(1).sum(1).float()
    return (inter / union.clamp(min=1)).tolist()


def label_ious(model, batch: dict) -> dict[str, list[float]]:
    """IoU with the ground truth of each positive's prediction and of its three pseudo labels (module
    docstring) for one mapped val image ``batch`` (``instances`` with ``gt_masks`` BitMasks)."""
    seen = {}
    # the tensors of the real training step (positives, mask grid, downsampled RGB) are taken from inside it,
    # so that this check cannot drift from what the loss sees
    real = condinst.CondInst._misa_losses

    def spy(self, raw, images, boxes, classes, out, prep, trained, mask_logits, box_grid_masks, it):
        seen.update(raw=raw, boxes=boxes, classes=classes, out=out, prep=prep, trained=trained,
                    probs=mask_logits.sigmoid(), box=box_grid_masks)
        return real(self, raw, images, boxes, classes, out, prep, trained, mask_logits, box_grid_masks, it)

    condinst.CondInst._misa_losses = spy
    try:
        model([batch])
    finally:
        condinst.CondInst._misa_losses = real
    misa, trained, probs = model.misa, seen["trained"], seen["probs"]
    hm, wm = probs.shape[-2:]
    gt_masks = batch["instances"].gt_masks.tensor.bool()
    gt = condinst._masks_on_grid([gt_masks], [len(gt_masks)], (hm, wm), model.mask_out_stride)[trained.object] > 0.5
    box = seen["box"][trained.object] > 0.5
    teacher = model.semantic_teacher()
    sem, _ = teacher.dense_features(teacher.preprocess_image(seen["raw"]).tensor)
    hf, wf = seen["out"].mask_feats.shape[-2:]
    sem = aligned_bilinear(sem[:, :, :hf, :wf], hm // hf)[:, :, :hm, :wm]
    classes = torch.cat(seen["classes"])[trained.object]
    rgb = seen["prep"]["images_rgb"]

    def pseudo(balance: float) -> torch.Tensor:
        return sepa_pseudo_labels(probs, rgb, sem, teacher.class_weights, trained.image, classes, balance,
                                  misa.dilations, misa.iterations, misa.sigma_scale)

    features = torch.cat([local_affinity(sem[i:i + 1], misa.dilations, False, misa.sigma_scale,
                                         teacher.class_weights[classes[j:j + 1]][None])[0]
                          for j, i in enumerate(trained.image.tolist())])
    feature_only = propagate(probs, sepa_affinity(torch.zeros_like(features), features, 1.0), misa.dilations,
                             misa.iterations)
    maps = {"prediction": probs, "sepa": pseudo(misa.balance), "colour_only": pseudo(0.0),
            "features_only": feature_only}
    return {k: mask_iou((m[:, 0] >= 0.5) & box, gt) for k, m in maps.items()}


def measure(config: Path, weights: Path, teacher: Path, val, dilations: str) -> dict:
    """Mean IoUs (:data:`LABELS`) over every positive of every val image, and their count ``n``."""
    cfg = build_config(str(config), [
        "MODEL.MISA.ENABLED", "True", "MODEL.MISA.FSD.ENABLED", "False", "MODEL.MISA.SEPA.ENABLED", "True",
        "MODEL.SIM.ENABLED", "False", "MODEL.MISA.SEPA.DILATIONS", f"({dilations},)",
        "MODEL.MISA.TEACHER.CONFIG", str(teacher / "config.yaml"),
        "MODEL.MISA.TEACHER.WEIGHTS", str(teacher / "model_final.pth"), "INPUT.MASK_FORMAT", "bitmask"],
        val_json=str(val.json), val_images=str(val.images))
    model = build_model(cfg)
    DetectionCheckpointer(model).load(str(weights))
    model.train()
    mapper = DatasetMapper(cfg, is_train=True, image_format=cfg.INPUT.FORMAT, use_instance_mask=True,
                           instance_mask_format="bitmask", recompute_boxes=False,
                           augmentations=[T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)])
    torch.manual_seed(0)  # the positives sampled for the loss
    rows = {k: [] for k in LABELS}
    with torch.no_grad():
        for record in DatasetCatalog.get(cfg.DATASETS.TEST[0]):
            batch = mapper(record)
            if len(batch["instances"]) == 0:
                continue
            model.iteration.fill_(cfg.SOLVER.MAX_ITER)  # past every warm-up
            for k, v in label_ious(model, batch).items():
                rows[k] += v
    return {k: statistics.mean(v) for k, v in rows.items()} | {"n": len(rows["sepa"])}


def main(argv=None) -> int:
    """Measure each ``--dilations`` variant, print it and (unless ``--no-write``) record it; returns 0.

    Raises:
        FileNotFoundError: the dataset's splits or a file of the ladder's run folder is missing.
    """
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="dataset folder with train/val splits")
    p.add_argument("--ladder", type=Path, required=True, help="the ladder's run folder (bsss/, misa_sepa/, boxinst/)")
    p.add_argument("--weights", type=Path, help="instance network (default <ladder>/boxinst/model_final.pth)")
    p.add_argument("--dilations", nargs="+", default=["1,2,4,8,12,24", "1,2"])
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    _, val = dataset_splits(args.data)
    weights = args.weights or args.ladder / "boxinst" / "model_final.pth"
    key = f"sepa-labels-{args.data.resolve().name}-{val.name}"
    for d in args.dilations:
        figures = measure(args.ladder / "misa_sepa" / "config.yaml", weights, args.ladder / "bsss", val, d)
        figures["weights"] = str(weights.relative_to(args.ladder) if weights.is_relative_to(args.ladder) else weights)
        print(key, d, figures, flush=True)
        if not args.no_write:
            record_results(key, "dilations_" + d.replace(",", "_"), figures,
                           f"python scripts/benchmark_sepa_labels.py --data {args.data} --ladder <ladder> "
                           f"--dilations {d}" + (f" --weights {weights}" if args.weights else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
