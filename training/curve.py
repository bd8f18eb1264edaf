"""Learning curves of the served recipe: box→mask quality against iterations, training images and
corrected masks, with GrabCut and the filled box as flat references.

Command line::

    python -m training.curve --data ../shared/data/balloon [--config configs/SIM_close_EffLite0_FPN_cpu.yaml]
        [--iters 1200] [--checkpoints 200,400,800,1200] [--aux-iters 400] [--fractions 0.25,0.5]
        [--masks 10,25,50,100]
        [--runs full,fractions,masks] [--engines map,refine,vote,refine+vote] [--budget-min 120] [--threads 1]
        [--seeds 1,2]
        [--key balloon-val]
        [--work /tmp/curve-balloon] [--no-write] [KEY VALUE ...]

Every run trains the recipe with ``python -m training.train`` in a subprocess (its CPU time is measured
with ``getrusage``) on the dataset's train split, and evaluates box→mask on its val split
(:func:`sim_model.evaluation.evaluate_box_to_mask`: mIoU per COCO size, mask AP with COCOeval,
median ms per box) with the engine variants built on the checkpoint (``--engines``): the SIM map
(``map``), the map refined by GrabCut (``refine``), the map voting with GrabCut (``vote``) and both
(``refine+vote``) (:mod:`sim_model.engines.sim`); at the full run's last checkpoint also ``whole``, the
same model without the close look (the ablation). Runs:

- ``full``: all train images, boxes only; evaluated at each of ``--checkpoints`` (the iteration curve);
- ``fractions``: the first ``--fractions`` of the train images (a seeded shuffle), boxes only,
  ``--aux-iters`` iterations (the data curve; the full run's point at that iteration is its 100 %);
- ``masks``: all images, boxes everywhere and ``--masks`` randomly drawn instances (seeded) also
  supervised by their ground-truth mask — the annotators' corrections — ``--aux-iters`` iterations (the
  full run's point there is its 0).

``--masks`` takes ``all`` for every instance of the train split that has a mask (rows ``…_mall``). With
``--seeds`` each run is trained once per seed (``SEED <s>``, folder ``<run>-s<s>``) and its point holds the
mean over the seeds of every figure, with ``seeds`` and, per engine, ``mIoU_per_seed`` (the spread).

A run whose work folder holds a finished ``train_result.json`` is not trained again (so a curve can be
built over several sessions); evaluations are cached in ``<work>/<run>/eval-<iteration>.json``.

Rows written under ``--key`` of docs/benchmarks.json (:func:`sim_model.results.record_results`):
``box`` and ``grabcut`` (references), ``learned`` (the best engine variant of the full run at the last
checkpoint whose training fits ``--budget-min`` CPU minutes), ``learned_masks50`` (the same with 50
corrected masks), and one row per curve point (``learned_<engine>@<it>``, ``learned_<engine>_f<pct>``,
``learned_<engine>_m<n>``, ``learned_<engine>_mall``), each with ``train_minutes_cpu``; a PNG per dataset, ``docs/curve-<key>.png``,
of every point recorded under the key (:func:`recorded_points`), so runs of earlier invocations stay on it.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import re
import resource
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from sim_model.datasets import REPO_ROOT, split_files
from sim_model.registry import engine_variants
from sim_model.results import DOCS_JSON, load_results, record_results

#: The rows kept in the docs table for each run (the per-box list is dropped).
FIGURES = ("mIoU", "mIoU_small", "mIoU_medium", "mIoU_large", "AP", "AP50", "AP75", "ms_per_box", "ms_per_image",
           "mask_precision", "mask_recall", "area_ratio", "n_boxes", "n_small", "n_medium", "n_large")
#: The engine variants the retrain's gate chooses from (:func:`sim_model.registry.engine_variants`).
ENGINES = tuple(engine_variants())
#: Evaluated at the full run's last checkpoint only: the same model without the close look (one network
#: pass on the whole image), the ablation of the close look.
ABLATION = ("whole",)
DEFAULT_CONFIG = "configs/SIM_close_EffLite0_FPN_cpu.yaml"


@dataclass
class Split:
    """A dataset split: COCO json and image folder."""

    name: str
    json: Path
    images: Path


def dataset_splits(data: Path) -> tuple[Split, Split]:
    """(train, val) of a dataset folder laid out as ``<split>/annotations/instances_<split>.json`` +
    ``<split>/images`` with splits ``train``/``val`` or ``train2017``/``val2017``.

    Raises:
        FileNotFoundError: neither layout is there.
    """
    for train, val in (("train", "val"), ("train2017", "val2017")):
        (tj, ti), (vj, vi) = split_files(data, train), split_files(data, val)
        if tj.is_file() and vj.is_file():
            return Split(train, tj, ti), Split(val, vj, vi)
    raise FileNotFoundError(f"{data}: no train/val (or train2017/val2017) split with annotations/instances_*.json")


def subset_json(src: Path, dst: Path, fraction: float = 1.0, n_masks: int = 0, seed: int = 0) -> dict:
    """Write a training json: the first ``fraction`` of the images (seeded shuffle), masks removed except on
    ``n_masks`` randomly drawn (seeded) non-crowd instances with a mask, which are marked
    ``mask_supervised`` (:data:`training.coco.MASK_SUPERVISED_KEY`).

    Returns:
        {"images", "boxes", "masks"}: counts written.

    Raises:
        ValueError: ``fraction`` not in (0, 1], or more masks asked than instances with a mask.
    """
    from training.coco import MASK_SUPERVISED_KEY

    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    data = json.loads(src.read_text())
    rng = random.Random(seed)
    images = sorted(data["images"], key=lambda im: im["id"])
    rng.shuffle(images)
    images = images[: max(1, math.ceil(fraction * len(images)))]
    ids = {im["id"] for im in images}
    anns = [dict(a) for a in data["annotations"] if a["image_id"] in ids]
    with_mask = [a for a in anns if a.get("segmentation") and not a.get("iscrowd", 0)]
    if n_masks > len(with_mask):
        raise ValueError(f"{n_masks} masks asked, the split has {len(with_mask)} instances with a mask")
    chosen = {a["id"] for a in rng.sample(sorted(with_mask, key=lambda a: a["id"]), n_masks)}
    for a in anns:
        if a["id"] in chosen:
            a[MASK_SUPERVISED_KEY] = True
        else:
            a.pop("segmentation", None)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(json.dumps(dict(data, images=images, annotations=anns)))
    return {"images": len(images), "boxes": sum(1 for a in anns if not a.get("iscrowd", 0)), "masks": len(chosen)}


def train_run(out: Path, config: str, train: Split, train_json: Path, iters: int, checkpoint_period: int,
              threads: int, opts: Sequence[str]) -> dict:
    """Train one run in a subprocess unless ``out/train_result.json`` exists; returns its record
    ``{"cpu_s", "wall_s", "iterations", "command"}`` (kept in ``out/curve_run.json``)."""
    record = out / "curve_run.json"
    if record.is_file() and (out / "train_result.json").is_file():
        return json.loads(record.read_text())
    steps = f"({int(0.75 * iters)}, {int(0.9 * iters)})"
    cmd = [sys.executable, "-m", "training.train", "--config", config, "--threads", str(threads),
           "--train-json", str(train_json), "--train-images", str(train.images),
           "OUTPUT_DIR", str(out), "DATASETS.TEST", "()", "SOLVER.MAX_ITER", str(iters), "SOLVER.STEPS", steps,
           "SOLVER.CHECKPOINT_PERIOD", str(checkpoint_period), "DATALOADER.NUM_WORKERS", "1", *opts]
    out.mkdir(parents=True, exist_ok=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    with open(out / "train_stdout.log", "w") as log:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"training failed (exit {proc.returncode}); see {out / 'train_stdout.log'}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    rec = {"cpu_s": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
           "wall_s": time.time() - t0, "iterations": iters, "command": shlex.join(cmd)}
    record.write_text(json.dumps(rec, indent=2))
    return rec


def checkpoint_path(out: Path, iteration: int, final_iter: int) -> Path:
    """The checkpoint after ``iteration`` steps (detectron2 names it by the last step index)."""
    if iteration >= final_iter and (out / "model_final.pth").is_file():
        return out / "model_final.pth"
    return out / f"model_{iteration - 1:07d}.pth"


def evaluate_checkpoint(out: Path, iteration: int, final_iter: int, val: Split, engines: Sequence[str] = ENGINES,
                        opts: Sequence[str] = ()) -> dict[str, dict]:
    """Box→mask figures of the checkpoint after ``iteration`` steps on ``val`` for each engine variant,
    cached in ``out/eval-<iteration>.json``."""
    cache = out / f"eval-{iteration}.json"
    done = json.loads(cache.read_text()) if cache.is_file() else {}
    todo = [e for e in engines if e not in done]
    if todo:
        from sim_model.engines.sim import SIMBoxToMask
        from sim_model.evaluation import evaluate_box_to_mask
        from training.evaluate import load_eval_model

        # class ids are the categories in id order (detectron2's contiguous ids; same json for train and val)
        names = [c["name"] for c in sorted(json.loads(val.json.read_text())["categories"], key=lambda c: c["id"])]
        cfg, model = load_eval_model(str(out / "config.yaml"), str(checkpoint_path(out, iteration, final_iter)),
                                     list(opts))
        for e in todo:
            steps = engine_variants().get(e, ())  # "whole": the map without the close look
            engine = SIMBoxToMask(model, cfg, names, model_version=f"curve-{e}", refine="refine" in steps,
                                  vote="vote" in steps, close_look=False if e == "whole" else None)
            res = evaluate_box_to_mask(engine, val.json, val.images, progress=False)
            done[e] = {k: res[k] for k in FIGURES if k in res}
            cache.write_text(json.dumps(done, indent=2))
    return {e: done[e] for e in engines}


def reference_rows(val: Split, work: Path) -> dict[str, dict]:
    """GrabCut and the filled box on ``val`` (cached in ``work/references.json``)."""
    cache = work / "references.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    from sim_model.engines import cold_start_engine
    from sim_model.engines.shape_prior import FilledBoxEngine
    from sim_model.evaluation import evaluate_box_to_mask

    rows = {}
    for name, engine in (("grabcut", cold_start_engine()), ("box", FilledBoxEngine())):
        res = evaluate_box_to_mask(engine, val.json, val.images, progress=False)
        rows[name] = {k: res[k] for k in FIGURES if k in res}
    work.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(rows, indent=2))
    return rows


def best_engine(figures: dict[str, dict], engines: Sequence[str] = ENGINES) -> str:
    """The engine variant among ``engines`` with the highest mIoU (ties: the first listed, fewer steps)."""
    return max((e for e in engines if e in figures), key=lambda e: figures[e]["mIoU"])


#: A curve point's row name: ``learned_<engine>@<iterations>`` (full run), ``…_f<percent>`` (fractions),
#: ``…_m<masks>`` (corrected masks).
ROW_NAME = re.compile(r"learned_(?P<engine>[a-z+]+)(?:@(?P<at>\d+)|_f(?P<f>\d+)|_m(?P<m>\d+|all))")
#: What a point carries besides its engines' figures.
POINT_META = ("iterations", "train_minutes_cpu", "n_train_images", "n_train_boxes", "n_masks")
#: Also carried when a point is the mean over several seeds (``--seeds``).
SEED_META = ("seeds",)


def mean_point(points: Sequence[dict], seeds: Sequence[int], engines: Sequence[str]) -> dict:
    """The point of one run trained with several seeds: every numeric figure averaged over the seeds,
    ``seeds``, and per engine ``mIoU_per_seed`` (in the order of ``seeds``).

    Args:
        points: one point per seed (:func:`main`'s points: meta keys and ``<engine>: {figures}``).
        seeds: the seeds, in the order of ``points``.
        engines: the engine variants the points hold.
    """
    out = {k: sum(q[k] for q in points) / len(points) for k in POINT_META if k in points[0]}
    out["seeds"] = list(seeds)
    for e in engines:
        if all(e in q for q in points):
            figs = {k: sum(q[e][k] for q in points) / len(points) for k in points[0][e]
                    if all(isinstance(q[e].get(k), (int, float)) for q in points)}
            figs["mIoU_per_seed"] = [q[e]["mIoU"] for q in points]
            out[e] = figs
    return out


def recorded_points(table: dict) -> tuple[list[dict], list[dict], list[dict]]:
    """The curve points recorded in one table of docs/benchmarks.json, as :func:`main` builds them: a point
    is ``{"iterations": …, "train_minutes_cpu": …, "n_train_images": …, "n_train_boxes": …, "n_masks": …,
    <engine>: {figures}}`` for every engine recorded at that point. The plot draws these, so a curve built
    over several sessions (whose run folders are gone) keeps its earlier points. As in :func:`main`, the full
    run's point at the fraction (corrected-mask) runs' iterations is their 100 % (0 masks) point when no row
    of its own records it (e.g. ``--runs fractions`` alone).

    Args:
        table: ``load_results()[key]``: row name → row.

    Returns:
        (iteration curve, fraction points, corrected-mask points), each sorted by its axis.
    """
    axes: dict[str, dict[str, dict]] = {"at": {}, "f": {}, "m": {}}
    for row_name, row in table.items():
        m = ROW_NAME.fullmatch(row_name)
        if m is None:
            continue
        axis = next(a for a in axes if m.group(a) is not None)
        point = axes[axis].setdefault(m.group(axis), {k: row[k] for k in POINT_META if k in row})
        point[m.group("engine")] = {k: row[k] for k in FIGURES + ("mIoU_per_seed",) if k in row}
    full_at = {q.get("iterations"): q for q in axes["at"].values()}
    for axis, whole in (("f", "100"), ("m", "0")):
        its = {q.get("iterations") for q in axes[axis].values()}
        if whole not in axes[axis] and len(its) == 1 and its <= full_at.keys():
            axes[axis][whole] = full_at[its.pop()]
    order = {"at": "iterations", "f": "n_train_images", "m": "n_masks"}
    return tuple(sorted(axes[a].values(), key=lambda q: q.get(order[a], 0)) for a in ("at", "f", "m"))


def plot(path: Path, key: str, curve: list[dict], fractions: list[dict], masks: list[dict], refs: dict) -> None:
    """mIoU against iterations, training boxes and corrected masks, GrabCut and the box as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("iterations", curve, "iterations"), ("training boxes", fractions, "n_train_boxes"),
              ("corrected masks", masks, "n_masks")]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4), sharey=True)
    for ax, (title, points, x) in zip(axes, panels):
        drawn = False
        for e, style in zip(ENGINES, itertools.cycle(("o-", "s--", "^-", "v--"))):
            pts = sorted((p[x], p[e]["mIoU"]) for p in points if e in p)
            if pts:
                ax.plot([a for a, _ in pts], [b for _, b in pts], style, label=f"SIM {e}")
                drawn = True
        for name, style in (("grabcut", "r:"), ("box", "k:")):
            ax.axhline(refs[name]["mIoU"], linestyle=":", color=style[0], label=name)
        if not drawn:
            ax.text(0.5, 0.5, "not measured", transform=ax.transAxes, ha="center", va="center", color="grey")
        ax.set_xlabel(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"box→mask mIoU ({key})")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m training.curve``; returns 0, or 2 on bad arguments."""
    p = argparse.ArgumentParser(prog="python -m training.curve", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, type=Path, help="dataset folder (train/val splits)")
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"the recipe (default {DEFAULT_CONFIG})")
    p.add_argument("--iters", type=int, default=1200, help="iterations of the full run (default 1200)")
    p.add_argument("--aux-iters", type=int, default=None,
                   help="iterations of the fractions and masks runs (default --iters; must be a checkpoint of the "
                        "full run, whose point there is their 100 %% / 0-mask reference)")
    p.add_argument("--checkpoints", default="200,400,800,1200", help="iterations evaluated in the full run")
    p.add_argument("--fractions", default="0.25,0.5", help="fractions of the train images (boxes only)")
    p.add_argument("--masks", default="10,25,50,100",
                   help="numbers of corrected masks (all images); 'all': every instance with a mask")
    p.add_argument("--seeds", default="", help="train each run once per seed (SEED <s>) and record the mean")
    p.add_argument("--runs", default="full,fractions,masks", help="which runs to train and evaluate now")
    p.add_argument("--engines", default=",".join(ENGINES), help=f"engine variants among {','.join(ENGINES)}")
    p.add_argument("--budget-min", type=float, default=120.0, help="CPU minutes the learned row may train")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the training process")
    p.add_argument("--key", default=None, help="table key in docs/benchmarks.json (default <dataset>-<val split>)")
    p.add_argument("--work", type=Path, default=None, help="run folders (default /tmp/curve-<dataset>)")
    p.add_argument("--no-write", action="store_true", help="print, do not touch docs/")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides of every run")
    args = p.parse_args(argv)
    try:
        train, val = dataset_splits(args.data)
        checkpoints = sorted({int(x) for x in args.checkpoints.split(",") if x})
        fractions = [float(x) for x in args.fractions.split(",") if x]
        n_with_mask = sum(1 for a in json.loads(train.json.read_text())["annotations"]
                          if a.get("segmentation") and not a.get("iscrowd", 0))
        masks = [n_with_mask if x == "all" else int(x) for x in args.masks.split(",") if x]
        seeds = [int(x) for x in args.seeds.split(",") if x]
        runs = set(args.runs.split(","))
        engines_asked = tuple(e for e in ENGINES if e in args.engines.split(","))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if len(args.opts) % 2 or not checkpoints or checkpoints[-1] > args.iters or runs - {"full", "fractions", "masks"} \
            or set(args.engines.split(",")) - set(ENGINES) or not engines_asked \
            or (args.aux_iters is not None and args.aux_iters not in checkpoints):
        print("error: KEY VALUE pairs, checkpoints <= --iters, --aux-iters among the checkpoints, runs among "
              f"full,fractions,masks, engines among {','.join(ENGINES)}", file=sys.stderr)
        return 2
    name = args.data.resolve().name
    key = args.key or f"{name}-{val.name}"
    work = args.work or Path(f"/tmp/curve-{name}")
    command = "python -m training.curve " + shlex.join([a for a in (argv if argv is not None else sys.argv[1:])])
    period = math.gcd(*checkpoints)
    refs = reference_rows(val, work)
    print(f"[curve] {key}: GrabCut mIoU {refs['grabcut']['mIoU']:.4f}, box {refs['box']['mIoU']:.4f}", flush=True)

    aux = args.aux_iters or args.iters

    def run(tag: str, fraction: float, n_masks: int, iters: int, evaluate_at: Sequence[int],
            ablation: bool = False) -> list[dict]:
        if not seeds:
            return run_seed(tag, fraction, n_masks, iters, evaluate_at, ablation, list(args.opts))
        per_seed = [run_seed(f"{tag}-s{sd}", fraction, n_masks, iters, evaluate_at, ablation,
                             list(args.opts) + ["SEED", str(sd)]) for sd in seeds]
        points = [mean_point(list(qs), seeds, engines_asked + ABLATION) for qs in zip(*per_seed)]
        for q in points:
            print(f"[curve] {tag} @{q['iterations']}, mean of seeds {seeds}: " + ", ".join(
                f"{e} {q[e]['mIoU']:.4f} {q[e]['mIoU_per_seed']}" for e in engines_asked if e in q), flush=True)
        return points

    def run_seed(tag: str, fraction: float, n_masks: int, iters: int, evaluate_at: Sequence[int],
                 ablation: bool, opts: list[str]) -> list[dict]:
        out = work / tag
        counts = subset_json(train.json, out / "train.json", fraction, n_masks)
        print(f"[curve] {tag}: {counts['images']} images, {counts['boxes']} boxes, {counts['masks']} masks; "
              f"training {iters} iterations", flush=True)
        rec = train_run(out, args.config, train, out / "train.json", iters, min(period, iters), args.threads,
                        opts)
        points = []
        for it in evaluate_at:
            engines = engines_asked + (ABLATION if ablation and it == evaluate_at[-1] else ())
            figs = evaluate_checkpoint(out, it, iters, val, engines, opts=opts)
            point = {"iterations": it, "train_minutes_cpu": rec["cpu_s"] / 60.0 * it / rec["iterations"],
                     "n_train_images": counts["images"], "n_train_boxes": counts["boxes"],
                     "n_masks": counts["masks"], **figs}
            print(f"[curve] {tag} @{it}: " + ", ".join(f"{e} {figs[e]['mIoU']:.4f}" for e in engines)
                  + f" ({point['train_minutes_cpu']:.0f} CPU min)", flush=True)
            points.append(point)
        return points

    curve, by_fraction, by_masks = [], [], []
    if "full" in runs:
        curve = run("full", 1.0, 0, args.iters, checkpoints, ablation=True)
    reference = [q for q in curve if q["iterations"] == aux]
    if "fractions" in runs:
        by_fraction = [q for f in fractions for q in run(f"f{int(round(f * 100))}-{aux}", f, 0, aux, [aux])]
        by_fraction += reference
    if "masks" in runs:
        by_masks = reference + [q for n in masks for q in run(f"m{n}-{aux}", 1.0, n, aux, [aux])]
    if args.no_write:
        return 0
    for name_, row in refs.items():
        record_results(key, name_, row, command)
    rows: dict[str, dict] = {}
    for q in curve:
        for e in engines_asked + ABLATION:
            if e in q:
                rows[f"learned_{e}@{q['iterations']}"] = q
    n_all = len(json.loads(train.json.read_text())["images"])
    for q in by_fraction:
        for e in engines_asked:
            rows[f"learned_{e}_f{round(100 * q['n_train_images'] / n_all)}"] = q
    for q in by_masks:
        for e in engines_asked:
            rows[f"learned_{e}_m{'all' if q['n_masks'] == n_with_mask else q['n_masks']}"] = q
    fitting = [q for q in curve if q["train_minutes_cpu"] <= args.budget_min]
    if fitting:
        rows["learned"] = fitting[-1]
    fifty = [q for q in by_masks if q["n_masks"] == 50]
    if fifty:
        rows["learned_masks50"] = fifty[0]
    for row_name, q in rows.items():
        point_row = ROW_NAME.fullmatch(row_name)  # a curve point's row names its engine; learned* the best
        e = point_row.group("engine") if point_row else best_engine(q, engines_asked)
        meta = {k: q[k] for k in POINT_META + SEED_META if k in q}
        if "seeds" in q:
            meta["n_seeds"] = len(q["seeds"])
        record_results(key, row_name, {**q[e], **meta, "engine": e}, command)
    # every point under the key, also those of earlier invocations (other --runs, run folders since deleted)
    plot(REPO_ROOT / "docs" / f"curve-{key}.png", key, *recorded_points(load_results()[key]), refs)
    print(f"[curve] wrote {DOCS_JSON} [{key}] and docs/curve-{key}.png", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
