"""The ladders of SIM's Table 3 and MISA's Table 3 on a dataset: every rung on the same schedule and seed.

Command line (from the repository root; ~25 min per rung of 700 iterations on one CPU core, MISA rungs
1.5–2x that)::

    python -m training.ladder [--data ../shared/data/coco-mini] [--out output/ladder]
        [--rungs boxinst,sim_pseudo,sim_full,misa_fsd,misa_sepa,misa,sim_misa] [--iters N]
        [--skip-train] [--no-write]

Rungs: ``boxinst`` (BoxInst), ``sim_pseudo`` (+ SIM's pseudo loss), ``sim_full`` (+ copy-paste) — SIM Table 3;
``misa_fsd`` (BoxInst + FSD), ``misa_sepa`` (BoxInst + SEPA), ``misa`` (both) — MISA Table 3; ``sim_misa``
(full SIM + MISA). The MISA rungs need the BSSS teacher, trained first on the same train split
(``configs/BSSS_EffLite0_FPN_cpu.yaml``, same schedule, in ``<out>/bsss``) and recorded as the row ``bsss``
(semantic mIoU on the val masks, its own training time).

For each rung it trains ``configs/<rung config>`` on the train split of ``--data`` (``training.train``, one
torch thread: on a shared 2-core machine two OpenMP threads are several times slower), then scores it on
the val split and records one row per rung under ``<dataset>-<val split>`` (e.g. ``balloon-val``) in
docs/benchmarks.json / .md through :func:`sim_model.results.record_results`:

- ``mask_AP`` / ``box_AP``: COCO segm / bbox AP (percent) of the free-running instance segmenter,
  from the evaluation at the end of training (detectron2's ``COCOEvaluator``; on a val split with more than
  100 instances in an image the network's and COCOeval's detection caps are raised to that count by
  :func:`training.train.build_config`);
- ``mIoU*``, ``AP*``, ``ms_per_box``, ``ms_per_image``: box→mask given the ground-truth boxes through the
  SIM predictor (:func:`training.evaluate.evaluate`, :func:`sim_model.evaluation.evaluate_box_to_mask`);
- ``train_step_s``: median seconds per training step after the SIM gate (``MODEL.SIM.WARMUP_ITERS``;
  all steps otherwise), from detectron2's ``metrics.json``; ``train_step_ratio``: that over the ``boxinst``
  row's of the same table when it has the same ``train_iters``;
- ``ms_first_box`` / ``ms_per_extra_box``: predictor time for one box on an image (network pass included)
  and the marginal time of each further box on the same image (best of 3 calls each, feature cache off),
  medians over the first 10 val images with ≥ 4 boxes.

``--iters N`` shortens (or lengthens) every rung and the teacher to N iterations, the LR steps at the same
fractions of the schedule as in the config (warm-ups and the SIM gate unchanged). ``--skip-train`` reuses
``<out>/<rung>/model_final.pth``.
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
from sim_model.datasets import coco_mini_dir
from sim_model.engines.sim import SIMBoxToMask
from sim_model.results import load_results, record_results
from training.curve import Split, dataset_splits
from training.evaluate import evaluate, load_eval_model

MISA_OPTS = ("MODEL.MISA.ENABLED", "True")
#: rung -> (config, KEY VALUE overrides); the MISA rungs also get the teacher's paths.
RUNGS = {
    "boxinst": ("configs/BoxInst_EffLite0_FPN_cpu.yaml", ()),
    "sim_pseudo": ("configs/SIM_pseudo_EffLite0_FPN_cpu.yaml", ()),
    "sim_full": ("configs/SIM_EffLite0_FPN_cpu.yaml", ()),
    "misa_fsd": ("configs/MISA_EffLite0_FPN_cpu.yaml", ("MODEL.MISA.SEPA.ENABLED", "False")),
    "misa_sepa": ("configs/MISA_EffLite0_FPN_cpu.yaml", ("MODEL.MISA.FSD.ENABLED", "False")),
    "misa": ("configs/MISA_EffLite0_FPN_cpu.yaml", ()),
    # the MISA recipe's two deviations from the paper (configs/MISA_EffLite0_FPN_cpu.yaml) on SIM's config
    "sim_misa": ("configs/SIM_EffLite0_FPN_cpu.yaml", MISA_OPTS + ("MODEL.MISA.FSD.WEIGHT", "0.01",
                                                               "MODEL.MISA.SEPA.SIGMA_SCALE", "0.1")),
}
TEACHER_CONFIG = "configs/BSSS_EffLite0_FPN_cpu.yaml"


def needs_teacher(rung: str) -> bool:
    """Whether a rung trains with MISA (and so needs the BSSS teacher)."""
    opts = RUNGS[rung][1]
    return "MISA" in RUNGS[rung][0] or "MODEL.MISA.ENABLED" in opts


def schedule_opts(config: str, iters: int | None) -> list[str]:
    """``SOLVER.MAX_ITER``/``SOLVER.STEPS`` overrides for ``iters`` iterations, the LR steps at the config's
    own fractions of its schedule ([] when ``iters`` is None)."""
    if iters is None:
        return []
    from training.train import build_config

    cfg = build_config(config)
    steps = tuple(int(round(s * iters / cfg.SOLVER.MAX_ITER)) for s in cfg.SOLVER.STEPS)
    steps = tuple(s for s in steps if 0 < s < iters)
    return ["SOLVER.MAX_ITER", str(iters), "SOLVER.STEPS", str(steps) if len(steps) != 1 else f"({steps[0]},)"]


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
    """``ms_first_box`` and ``ms_per_extra_box`` of the SIM predictor (medians over images with >= 4 boxes;
    {} when the val split has none)."""
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
    if not first:
        return {}
    return {"ms_first_box": statistics.median(first), "ms_per_extra_box": statistics.median(extra)}


def _train(config: str, run_dir: Path, train: Split, val: Split, opts: list[str]) -> None:
    cmd = [sys.executable, "-m", "training.train", "--threads", "1", "--config", config,
           "--train-json", str(train.json), "--train-images", str(train.images),
           "--val-json", str(val.json), "--val-images", str(val.images), "OUTPUT_DIR", str(run_dir), *opts]
    print("[ladder]", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))


def run_teacher(out: Path, train: Split, val: Split, iters: int | None, skip_train: bool, key: str,
                command: str, write: bool) -> tuple[Path, Path]:
    """Train (unless ``skip_train`` finds ``<out>/bsss/model_final.pth``) and record MISA's BSSS teacher.

    Args:
        out: the ladder's run folder; train, val: the dataset's splits (val: semantic mIoU on its masks).
        iters: iterations (None: the config's schedule); key: the results table; command: the row's command;
        write: record the row ``bsss`` (``sem_mIoU``, ``sem_mIoU_fg`` in percent, ``train_step_s``,
            ``train_iters``, ``train_minutes``: its own training time, wall clock).

    Returns:
        (its config.yaml, its final checkpoint).

    Raises:
        subprocess.CalledProcessError: its training failed.
    """
    run_dir = out / "bsss"
    if not (skip_train and (run_dir / "model_final.pth").is_file()):
        _train(TEACHER_CONFIG, run_dir, train, val, schedule_opts(TEACHER_CONFIG, iters))
    result = json.loads((run_dir / "train_result.json").read_text())
    sem = result["metrics"].get("sem_seg", {})
    figures = {"sem_mIoU": sem.get("mIoU"), "sem_mIoU_fg": sem.get("mIoU_fg"),
               "train_step_s": step_time(run_dir / "metrics.json", 0), "train_iters": result["iterations"],
               "train_minutes": result["seconds"] / 60}
    print(f"[ladder] bsss: {json.dumps(figures)}", flush=True)
    if write:
        record_results(key, "bsss", figures, command)
    return run_dir / "config.yaml", run_dir / "model_final.pth"


def run_rung(rung: str, out: Path, train: Split, val: Split, key: str, iters: int | None, skip_train: bool,
             write: bool, command: str, teacher: tuple[Path, Path] | None = None) -> dict:
    """Train (unless ``skip_train``), evaluate and record one rung; returns its figures."""
    run_dir = out / rung
    config, extra = RUNGS[rung]
    if not (skip_train and (run_dir / "model_final.pth").is_file()):
        opts = schedule_opts(config, iters) + list(extra)
        if teacher is not None:
            opts += ["MODEL.MISA.TEACHER.CONFIG", str(teacher[0]), "MODEL.MISA.TEACHER.WEIGHTS", str(teacher[1])]
        _train(config, run_dir, train, val, opts)
    cfg = CfgNode.load_yaml_with_base(str(run_dir / "config.yaml"))
    sim = cfg["MODEL"]["SIM"]
    gate = int(sim["WARMUP_ITERS"]) if sim["ENABLED"] else 0
    train_result = json.loads((run_dir / "train_result.json").read_text())
    inst = train_result["metrics"]
    b2m = evaluate(str(run_dir / "config.yaml"), str(run_dir / "model_final.pth"), str(val.json), str(val.images),
                   instance_seg=False)["box_to_mask"]
    figures = {k: b2m[k] for k in ("mIoU", "mIoU_small", "mIoU_medium", "mIoU_large", "AP", "AP50", "AP75",
                                   "ms_per_box", "ms_per_image") if k in b2m}
    figures.update({
        "mask_AP": inst["segm"]["AP"], "box_AP": inst["bbox"]["AP"],
        "train_step_s": step_time(run_dir / "metrics.json", gate),
        "train_iters": train_result["iterations"],
        **extra_box_time(run_dir / "config.yaml", run_dir / "model_final.pth", val.json, val.images),
    })
    # the BoxInst row of the same table and schedule (this run's when it trained one first)
    base_row = load_results().get(key, {}).get("boxinst", {})
    base = base_row.get("train_step_s") if base_row.get("train_iters") == figures["train_iters"] else None
    if rung != "boxinst" and base and figures["train_step_s"]:
        figures["train_step_ratio"] = figures["train_step_s"] / base
    print(f"[ladder] {rung}: " + json.dumps({k: round(v, 4) if isinstance(v, float) else v
                                              for k, v in figures.items()}), flush=True)
    if write:
        record_results(key, rung, figures, command)
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
    p.add_argument("--data", type=Path, default=None, help="dataset folder (default: the shared coco-mini)")
    p.add_argument("--out", type=Path, default=None, help="run folders (default output/ladder[-<dataset>])")
    p.add_argument("--rungs", default=",".join(RUNGS))
    p.add_argument("--iters", type=int, default=None, help="iterations of every rung (default: the configs')")
    p.add_argument("--skip-train", action="store_true", help="reuse <out>/<rung>/model_final.pth")
    p.add_argument("--no-write", action="store_true", help="print, do not touch docs/benchmarks.*")
    args = p.parse_args(argv)
    rungs = [r for r in args.rungs.split(",") if r]
    unknown = [r for r in rungs if r not in RUNGS]
    if unknown:
        p.error(f"unknown rungs {unknown}; choose from {list(RUNGS)}")
    data = args.data or coco_mini_dir()
    train, val = dataset_splits(data)
    key = f"{data.resolve().name}-{val.name}"
    out = args.out or Path("output") / ("ladder" if args.data is None else f"ladder-{data.resolve().name}")
    prefix = "python -m training.ladder" + (f" --data {args.data}" if args.data else "") + \
        (f" --iters {args.iters}" if args.iters else "")
    teacher = None
    if any(needs_teacher(r) for r in rungs):
        teacher = run_teacher(out, train, val, args.iters, args.skip_train, key, f"{prefix} --rungs misa",
                              not args.no_write)
    for r in rungs:
        run_rung(r, out, train, val, key, args.iters, args.skip_train, not args.no_write, f"{prefix} --rungs {r}",
                 teacher if needs_teacher(r) else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
