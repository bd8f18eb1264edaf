"""Prelabel throughput on coco-mini val2017 through a real Label Studio; a row of docs/benchmarks.json.

    .venv/bin/python scripts/benchmark_prelabel.py [--images 79] [--no-write]

Starts a stock Label Studio 1.23.2 (tests/e2e/ls_harness.py: legacy tokens off, a Personal Access Token),
imports the val2017 images through a Local Files storage with their ground-truth boxes as annotations, and
runs ``training.prelabel.prelabel`` (the cold-start GrabCut engine) on the project; records tasks/minute,
boxes/second and the seconds of the run in table ``label-studio-prelabel``.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sim_backend.label_studio import LabelStudioConnection  # noqa: E402
from sim_backend.settings import Settings  # noqa: E402
from sim_model.datasets import coco_mini_dir, split_files  # noqa: E402
from sim_model.results import machine_description, record_results  # noqa: E402
from tests.e2e import ls_harness as H  # noqa: E402
from training.prelabel import prelabel  # noqa: E402


def main() -> int:
    """Command-line entry point (module docstring; arguments from ``sys.argv``).

    Returns:
        0 when every image's task got a prelabel, 1 otherwise (the figures are printed, and recorded in
        docs/benchmarks.json / .md unless ``--no-write``, either way).

    Raises:
        SystemExit: status 2 on a usage error.
        Exception: from the Label Studio harness (``tests/e2e/ls_harness.py``) when Label Studio cannot be
            started or set up, or from coco-mini missing (``FileNotFoundError``).
    """
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=79)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    ann, images_dir = split_files(coco_mini_dir(), "val2017")
    coco = json.loads(ann.read_text())
    images = sorted(coco["images"], key=lambda i: i["id"])[: args.images]
    ids = {i["id"] for i in images}
    subset = {"images": images, "categories": coco["categories"],
              "annotations": [a for a in coco["annotations"] if a["image_id"] in ids]}
    n_boxes = sum(1 for a in subset["annotations"] if not a.get("iscrowd"))
    root = Path(tempfile.mkdtemp(prefix="prelabel-bench-"))
    machine = machine_description()
    with H.LabelStudioServer(root / "server", root / "docroot") as ls:
        client = ls.client()
        pid = H.create_project(client, "prelabel benchmark", H.labeling_config([c["name"] for c in coco["categories"]]))
        H.add_local_files_storage(client, pid, H.stage_images(images, images_dir, ls.document_root / "val"))
        H.create_gt_box_annotations(client, pid, subset)
        settings = Settings(model_dir=root / "models")
        report = prelabel(str(pid), LabelStudioConnection(ls.url, ls.api_key), settings)
    fig = {"tasks": report.tasks, "written": report.written, "boxes": n_boxes, "seconds": report.seconds,
           "tasks_per_minute": report.tasks_per_minute, "boxes_per_second": n_boxes / report.seconds,
           "engine": report.model_version, "failed": len(report.failed)}
    print(json.dumps(fig, indent=2))
    if not args.no_write:
        record_results("label-studio-prelabel", f"coco-mini-val2017-{report.model_version}", fig,
                       f"python scripts/benchmark_prelabel.py --images {args.images}", machine=machine)
    return 0 if report.written == len(images) else 1


if __name__ == "__main__":
    sys.exit(main())
