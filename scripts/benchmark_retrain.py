"""A night's retrain of a 500-image project through a real Label Studio; a row of docs/benchmarks.json.

    .venv/bin/python scripts/benchmark_retrain.py [--images 500] [--masks 60] [--no-write] [-- RETRAIN ARGS]

Builds one stock Label Studio 1.23.2 project (tests/e2e/ls_harness.py: legacy tokens off, a Personal
Access Token) from every shared training image — coco-mini train2017, balloon train, dsb2018-nuclei
train, then dsb2018-nuclei val until ``--images`` — with their ground-truth boxes as annotations, and
the polygons of ``--masks`` randomly drawn (seeded) coco-mini/balloon instances as annotators' masks.
Then runs ``python -m training.retrain --project N`` exactly as cron would (the default recipe and the
schedule rule, 2 torch threads) and records the seconds of each of its steps, the iterations and the
total in table ``retrain-night``. The target: within 2 hours on 2 CPU cores.

With ``-- --max-iter N`` (a shorter training, every other step in full) the row is named
``<images>-images-2-cpu-cores-max-iter-N`` and adds ``schedule_iterations`` (what the schedule rule gives
the project), ``s_per_iteration_sim`` (seconds per step once SIM's losses run, ``MODEL.SIM.WARMUP_ITERS``
on: the slope of detectron2's time-stamped progress lines past it, one every 20 iterations, so N must pass
it by 40 or more) and
``projected_minutes``: the run as measured plus the schedule's remaining iterations at that rate.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sim_model.datasets import REPO_ROOT, shared_data_dir, split_files  # noqa: E402
from sim_model.results import machine_description, record_results  # noqa: E402
from tests.e2e import ls_harness as H  # noqa: E402
from tests.support import poly_item  # noqa: E402

SOURCES = (("coco-mini", "train2017"), ("balloon", "train"), ("dsb2018-nuclei", "train"), ("dsb2018-nuclei", "val"))


def merged_dataset(n_images: int, folder: Path) -> dict:
    """One COCO dict of the first ``n_images`` images of :data:`SOURCES` (files copied into ``folder`` with
    the dataset's name as prefix), categories united by name."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {"images": [], "annotations": [], "categories": []}
    cat_ids: dict[str, int] = {}
    for ds, split in SOURCES:
        json_file, images = split_files(shared_data_dir() / ds, split)
        data = json.loads(json_file.read_text())
        names = {c["id"]: c["name"] for c in data["categories"]}
        for c in data["categories"]:
            cat_ids.setdefault(c["name"], len(cat_ids) + 1)
        by_image: dict[int, list] = {}
        for a in data["annotations"]:
            by_image.setdefault(a["image_id"], []).append(a)
        for im in sorted(data["images"], key=lambda i: i["id"]):
            if len(out["images"]) >= n_images:
                break
            new_id = len(out["images"]) + 1
            name = f"{ds}-{im['file_name']}"
            shutil.copyfile(images / im["file_name"], folder / name)
            out["images"].append(dict(im, id=new_id, file_name=name))
            for a in by_image.get(im["id"], []):
                out["annotations"].append(dict(a, id=len(out["annotations"]) + 1, image_id=new_id,
                                               category_id=cat_ids[names[a["category_id"]]]))
    out["categories"] = [{"id": i, "name": n} for n, i in cat_ids.items()]
    return out


def polygon_result(coco: dict, a: dict) -> dict:
    """An instance's single COCO polygon as a ``polygonlabels`` result of the harness's ``polygon`` tag."""
    img = next(i for i in coco["images"] if i["id"] == a["image_id"])
    name = next(c["name"] for c in coco["categories"] if c["id"] == a["category_id"])
    item = poly_item(name, a["segmentation"][0], img["width"], img["height"], f"poly{a['id']}")
    return dict(item, from_name="polygon")


def main() -> int:
    """Command-line entry point (module docstring); returns the retrain's exit code."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=500)
    p.add_argument("--masks", type=int, default=60)
    p.add_argument("--no-write", action="store_true")
    p.add_argument("retrain_args", nargs="*", help="extra arguments of python -m training.retrain (after --)")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="retrain-bench-"))
    machine = machine_description()
    with H.LabelStudioServer(root / "server", root / "docroot") as ls:
        client = ls.client()
        coco = merged_dataset(args.images, ls.document_root / "night")
        pid = H.create_project(client, "a night's retrain", H.labeling_config([c["name"] for c in coco["categories"]],
                                                                               brush=False))
        H.add_local_files_storage(client, pid, ls.document_root / "night")
        polygons = [a for a in coco["annotations"] if isinstance(a.get("segmentation"), list)
                    and len(a["segmentation"]) == 1 and not a.get("iscrowd")]
        chosen = {a["id"] for a in random.Random(0).sample(polygons, min(args.masks, len(polygons)))}
        by_name = {i["file_name"]: i["id"] for i in coco["images"]}
        for task in H.list_tasks(client, pid):
            image_id = by_name[H.task_file_name(task)]
            result = H.coco_box_results(coco, image_id)
            result += [polygon_result(coco, a) for a in coco["annotations"]
                       if a["image_id"] == image_id and a["id"] in chosen]
            client.annotations.create(id=task["id"], result=result)
        n_boxes = sum(1 for a in coco["annotations"] if not a.get("iscrowd"))
        cmd = [sys.executable, "-m", "training.retrain", "--project", str(pid), "--url", ls.url, "--api-key",
               ls.api_key, "--model-dir", str(root / "models"), *args.retrain_args]
        print("$ " + " ".join(cmd[:6]) + " …", flush=True)
        t0 = time.monotonic()
        steps: dict[str, float] = {}
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=dict(os.environ, OMP_NUM_THREADS="2"))
        iterations = None
        progress: list[tuple[float, int]] = []  # (seconds since the run began, iteration) of detectron2's lines
        for line in proc.stdout:
            print(line, end="", flush=True)
            m = re.match(r"\[retrain\] (\d)/7", line)
            if m:
                steps.setdefault(m.group(1), time.monotonic() - t0)
            it = re.search(r"training iterations (\d+)\.\.(\d+)", line)
            if it:
                iterations = int(it.group(2)) - int(it.group(1))
            ev = re.search(r"d2\.utils\.events\]:.* iter: (\d+)", line)
            if ev:
                progress.append((time.monotonic() - t0, int(ev.group(1))))
        rc = proc.wait()
        total = time.monotonic() - t0
    order = sorted(steps)
    seconds = {f"step{k}_s": (steps[order[i + 1]] if i + 1 < len(order) else total) - steps[k]
               for i, k in enumerate(order)}
    fig = {"images": len(coco["images"]), "boxes": n_boxes, "masks": len(chosen), "iterations": iterations,
           "total_minutes": total / 60.0, "exit": rc, **seconds}
    row = f"{args.images}-images-2-cpu-cores"
    if any(a.split("=")[0] == "--max-iter" for a in args.retrain_args) and iterations and "step4_s" in seconds:
        from training.retrain import DEFAULT_CONFIG, _parser, retrain_schedule
        from training.train import build_config

        row += f"-max-iter-{iterations}"
        # the configuration the retrain trained: its --config (a first version) and KEY VALUE overrides
        given = _parser().parse_args(["--project", "1", *args.retrain_args])
        cfg = build_config(str(REPO_ROOT / (given.config or DEFAULT_CONFIG)), given.opts)
        schedule = retrain_schedule(cfg, len({a["image_id"] for a in coco["annotations"]}))[0]
        fig["schedule_iterations"] = schedule
        sim = [(t, i) for t, i in progress if i >= cfg.MODEL.SIM.WARMUP_ITERS]
        if len(sim) >= 2 and sim[-1][1] > sim[0][1]:
            rate = (sim[-1][0] - sim[0][0]) / (sim[-1][1] - sim[0][1])
            fig["s_per_iteration_sim"] = rate
            fig["projected_minutes"] = (total + rate * max(schedule - iterations, 0)) / 60.0
    print(json.dumps(fig, indent=2))
    if not args.no_write:
        record_results("retrain-night", row, fig, " ".join(["python scripts/benchmark_retrain.py", *sys.argv[1:]]),
                       machine=machine)
    return rc


if __name__ == "__main__":
    sys.exit(main())
