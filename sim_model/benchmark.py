"""Box→mask quality and speed of the engines on a COCO dataset split; rows go to docs/benchmarks.json / .md.

Usage (from the repository root)::

    python -m sim_model.benchmark [--engines box,grabcut] [--split val2017] [--max-images N]
                                  [--data-dir DIR] [--options JSON] [--no-write]

Every non-crowd ground-truth box of the split goes through each engine
(:func:`sim_model.evaluation.evaluate_box_to_mask`); the figures are printed as a table and merged into
docs/benchmarks.json under ``"<dataset folder name>-<split>" → "<method>"`` (other rows are kept,
:func:`sim_model.results.record_results`). ``--data-dir`` defaults to coco-mini in the shared data
folder (:mod:`sim_model.datasets`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

from sim_model.box_to_mask import BoxToMask
from sim_model.datasets import REPO_ROOT, coco_mini_dir, split_files
from sim_model.engines.grabcut import GrabCutBoxToMask
from sim_model.engines.shape_prior import EllipseEngine, FilledBoxEngine
from sim_model.evaluation import evaluate_box_to_mask
from sim_model.results import COLUMNS, DOCS_JSON, DOCS_MD, fmt, machine_description, record_results

#: The engines this benchmark can build: name → constructor (keyword options from ``--options``).
ENGINES: dict[str, Callable[..., BoxToMask]] = {"box": FilledBoxEngine, "ellipse": EllipseEngine,
                                                "grabcut": GrabCutBoxToMask}
#: Figures of :func:`evaluate_box_to_mask` that a row keeps.
FIGURE_KEYS = ["mIoU", "mIoU_small", "mIoU_medium", "mIoU_large", "AP", "AP50", "AP75", "AP_small",
               "AP_medium", "AP_large", "mask_precision", "mask_recall", "area_ratio", "ms_per_box", "ms_per_image",
               "n_images", "n_boxes", "model_version"]


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    p = argparse.ArgumentParser(prog="python -m sim_model.benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("--engines", default="box,grabcut", help=f"comma list of {sorted(ENGINES)}")
    p.add_argument("--split", default="val2017", help="dataset split (coco-mini: val2017 or train2017)")
    p.add_argument("--max-images", type=int, default=None, help="first N images only (by image id)")
    p.add_argument("--data-dir", default=None, help="dataset folder (default: coco-mini in the shared data)")
    p.add_argument("--options", default=None,
                   help='JSON keyword arguments for the engines\' constructors, e.g. \'{"short_side": 160}\'; '
                        'rows are then named "<engine>+key=value,..." so the shipped rows stay')
    p.add_argument("--no-write", action="store_true", help="print only; do not touch docs/benchmarks.*")
    p.add_argument("--quiet", action="store_true", help="no per-image progress")
    args = p.parse_args(argv)

    names = [n.strip() for n in args.engines.split(",") if n.strip()]
    unknown = [n for n in names if n not in ENGINES]
    if unknown:
        p.error(f"unknown engine(s) {unknown}; choose from {sorted(ENGINES)}")
    root = Path(args.data_dir) if args.data_dir else coco_mini_dir()
    ann, img_dir = split_files(root, args.split)
    if not ann.exists():
        print(f"error: {ann} not found (set --data-dir)", file=sys.stderr)
        return 2
    dataset = f"{root.name}-{args.split}"
    if args.max_images is not None:
        dataset += f"-first{args.max_images}"
    command = "python -m sim_model.benchmark " + " ".join(argv if argv is not None else sys.argv[1:])

    options = json.loads(args.options) if args.options else {}
    suffix = ("+" + ",".join(f"{k}={v}" for k, v in options.items())) if options else ""
    results = {}
    for name in names:
        engine = ENGINES[name](**options)
        load_before = machine_description()
        res = evaluate_box_to_mask(engine, ann, img_dir, max_images=args.max_images, progress=not args.quiet)
        fig = {k: res[k] for k in FIGURE_KEYS if k in res}
        config = {k: v for k, v in vars(engine).items() if not k.startswith("_")}
        if config:
            fig["config"] = config
        results[name + suffix] = fig
        if not args.no_write:
            record_results(dataset, name + suffix, fig, command.strip(), machine=load_before)
    print(f"\n{dataset}: {len(names)} engine(s), {next(iter(results.values()))['n_boxes']} boxes")
    width = max(10, *(len(n) + 2 for n in results))
    print(f"{'method':<{width}}" + "".join(f"{h:>10}" for _, h, _ in COLUMNS))
    for name, fig in results.items():
        print(f"{name:<{width}}" + "".join(f"{fmt(fig.get(k), f):>10}" for k, _, f in COLUMNS))
    if not args.no_write:
        print(f"\nwrote {DOCS_JSON.relative_to(REPO_ROOT)} and {DOCS_MD.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
