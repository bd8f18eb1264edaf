"""Interactive latency: an annotator draws boxes one by one on an image, each box is one /predict.

Command line::

    python -m training.interactive_benchmark [--data ../shared/data/coco-mini] [--split val2017]
        [--version-dir models/12/v0004] [--engines grabcut,map,refine] [--images 20] [--boxes 6]
        [--threads 2] [--no-write]

For each of the first ``--images`` images of the split with at least two boxes, its first ``--boxes``
ground-truth boxes are sent one at a time through the backend's own request path
(:class:`sim_backend.predict.Predictor`: image load and cache, the engine, mask → polygon regions), as
Label Studio does when an annotator draws them. "first box" is the first request on an image (image read
and decode, and for a whole-image engine its network pass), "further box" every later one. The medians
go to docs/benchmarks.json under ``interactive-<dataset>-<split>`` (targets: first ≤ 300 ms, further ≤ 50
ms on 2 cores).

Engines: ``grabcut`` (the cold start); ``map``, ``refine``, ``vote`` and ``refine+vote`` (the SIM version
in ``--version-dir`` alone and with its colour steps, :mod:`sim_model.engines.sim`); ``whole`` (that
version's map without the close look: one network pass per image).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from sim_backend.engines import EngineProvider
from sim_backend.images import ImageLoader
from sim_backend.predict import Predictor
from sim_backend.settings import Settings
from sim_model.datasets import coco_mini_dir, split_files
from sim_model.engines import cold_start_engine, version_engine
from sim_model.registry import engine_variants
from sim_model.results import record_results

#: The engines measured: the cold start, a SIM version's variants (:func:`sim_model.registry.engine_variants`),
#: and its map without the close look.
ENGINES = ("grabcut", *engine_variants(), "whole")


def _config(labels: Sequence[str]) -> str:
    items = "".join(f'<Label value="{name}"/>' for name in labels)
    return (f'<View><Image name="image" value="$image"/><RectangleLabels name="box" toName="image">{items}'
            f'</RectangleLabels><PolygonLabels name="polygon" toName="image">{items}</PolygonLabels></View>')


def _rect(label: str, xywh: Sequence[float], width: int, height: int) -> dict:
    x, y, w, h = xywh
    return {"id": "r1", "type": "rectanglelabels", "from_name": "box", "to_name": "image", "original_width": width,
            "original_height": height, "value": {"x": 100 * x / width, "y": 100 * y / height, "width": 100 * w / width,
                                                 "height": 100 * h / height, "rectanglelabels": [label]}}


def measure(engine, json_file: Path, images: Path, n_images: int, n_boxes: int) -> dict:
    """Median ms of the first and of the further boxes on each image (module docstring)."""
    data = json.loads(json_file.read_text())
    names = {c["id"]: c["name"] for c in data["categories"]}
    by_image: dict[int, list] = {}
    for a in data["annotations"]:
        if not a.get("iscrowd", 0) and a["bbox"][2] >= 2 and a["bbox"][3] >= 2:
            by_image.setdefault(a["image_id"], []).append(a)
    settings = Settings(local_files_roots=(str(images.resolve()),))
    predictor = Predictor(settings, EngineProvider(settings, fallback_factory=lambda: engine),
                          ImageLoader(settings))
    config = _config(sorted(set(names.values())))
    first, further = [], []
    infos = [i for i in sorted(data["images"], key=lambda i: i["id"]) if len(by_image.get(i["id"], [])) >= 2]
    for info in infos[:n_images]:
        path = str((images / info["file_name"]).resolve())
        for k, a in enumerate(by_image[info["id"]][:n_boxes]):
            payload = {"label_config": config, "project": 1, "tasks": [{"id": 1, "data": {"image": path}}],
                       "params": {"context": {"result": [_rect(names[a["category_id"]], a["bbox"], info["width"],
                                                                info["height"])]}}}
            t0 = time.perf_counter()
            answer = predictor.predict(payload, engine=engine)
            (first if k == 0 else further).append((time.perf_counter() - t0) * 1000.0)
            if answer["errors"]:
                raise RuntimeError(f"image {info['id']}: {answer['errors']}")
    return {"first_box_ms": float(np.median(first)), "further_box_ms": float(np.median(further)),
            "first_box_ms_p90": float(np.percentile(first, 90)), "further_box_ms_p90": float(np.percentile(further, 90)),
            "n_images": len(first), "n_boxes": len(first) + len(further)}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m training.interactive_benchmark``; returns 0, or 2 on bad arguments."""
    p = argparse.ArgumentParser(prog="python -m training.interactive_benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=None, help="dataset folder (default coco-mini)")
    p.add_argument("--split", default="val2017")
    p.add_argument("--version-dir", type=Path, default=None, help="a SIM model version (for every engine but grabcut)")
    p.add_argument("--engines", default="grabcut,map,refine")
    p.add_argument("--images", type=int, default=20)
    p.add_argument("--boxes", type=int, default=6)
    p.add_argument("--threads", type=int, default=2, help="torch threads (the backend's worker gets the cores)")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    root = args.data or coco_mini_dir()
    json_file, images = split_files(root, args.split)
    engines = [e for e in args.engines.split(",") if e]
    if not json_file.is_file() or (set(engines) - {"grabcut"} and args.version_dir is None) or \
            set(engines) - set(ENGINES):
        print("error: a dataset split with annotations, --version-dir for the SIM engines, engines among "
              + ",".join(ENGINES), file=sys.stderr)
        return 2
    key = f"interactive-{root.resolve().name}-{args.split}"
    command = "python -m training.interactive_benchmark " + shlex.join(list(argv if argv is not None else sys.argv[1:]))
    for name in engines:
        if name == "grabcut":
            engine = cold_start_engine()
        else:
            engine = version_engine(args.version_dir, steps=engine_variants().get(name, ()))
            engine.close_look = engine.close_look and name != "whole"
        row = measure(engine, json_file, images, args.images, args.boxes)
        print(f"{key} {name} ({engine.model_version}): first box {row['first_box_ms']:.0f} ms, further boxes "
              f"{row['further_box_ms']:.0f} ms (median; {row['n_images']} images, {row['n_boxes']} boxes)", flush=True)
        if not args.no_write:
            record_results(key, name, {**row, "model_version": engine.model_version}, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
