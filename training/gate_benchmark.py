"""How the retrain's choice of engine variant does when a project has few held-out masks.

Command line::

    python -m training.gate_benchmark --data ../shared/data/coco-mini --run /tmp/curve-coco-mini/full
        [--iteration 800] [--held-out 10,25,50,100] [--z 0,1,2] [--draws 2000] [--no-write]

The run folder is one of :mod:`training.curve`'s (``config.yaml`` and checkpoints). Each engine variant
of the checkpoint (:func:`sim_model.registry.engine_variants`: the map, + refine, + vote, + both) gives its
IoU per box of the dataset's val split (:func:`sim_model.evaluation.evaluate_box_to_mask`; cached in
``<run>/gate-<iteration>.json``). Then, for each number k of held-out masks, ``--draws`` times: k val boxes
drawn at random play the project's held-out masks, :func:`training.publish.choose_variant` picks a variant
from their IoUs (default the vote, ``RETRAIN.GATE.DEFAULT_VARIANT``) with each ``--z`` (``SWITCH_Z``;
0 = the plain best), and the picked variant's mIoU on the other val boxes is compared with the vote's.

Rows under ``gate-<dataset>-<val split>`` of docs/benchmarks.json, one per z (``z0``, ``z1``, ``z2``):
``gain_k<k>`` (mean over the draws of picked − vote on the other boxes, mIoU in [−1, 1]),
``gain_p5_k<k>`` (its 5th percentile: how bad an unlucky draw is), ``default_share_k<k>`` (share of
draws that kept the vote); a row ``variants`` holds each variant's mIoU on the whole split.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from sim_model.registry import engine_variants
from sim_model.results import record_results
from training.curve import checkpoint_path, dataset_splits
from training.publish import choose_variant


def per_box_ious(run: Path, iteration: int, data: Path) -> dict[str, list[float]]:
    """Each engine variant's IoU per val box (annotation-id order) for the checkpoint after ``iteration``
    steps of ``run``, cached in ``run/gate-<iteration>.json``.

    Raises:
        FileNotFoundError: no such checkpoint, or the dataset lacks a train/val split.
    """
    cache = run / f"gate-{iteration}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    from sim_model.engines.sim import SIMBoxToMask
    from sim_model.evaluation import evaluate_box_to_mask
    from training.evaluate import load_eval_model

    _, val = dataset_splits(data)
    weights = checkpoint_path(run, iteration, iteration)
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: no checkpoint after {iteration} iterations in {run}")
    names = [c["name"] for c in sorted(json.loads(val.json.read_text())["categories"], key=lambda c: c["id"])]
    cfg, model = load_eval_model(str(run / "config.yaml"), str(weights), [])
    out = {}
    for name, steps in engine_variants().items():
        engine = SIMBoxToMask(model, cfg, names, model_version=f"gate-{name}", refine="refine" in steps,
                              vote="vote" in steps)
        ev = evaluate_box_to_mask(engine, val.json, val.images, progress=False)
        out[name] = [b["iou"] for b in sorted(ev["per_box"], key=lambda b: b["ann_id"])]
        print(f"[gate] {name}: mIoU {ev['mIoU']:.4f} on {len(out[name])} boxes", flush=True)
    cache.write_text(json.dumps(out))
    return out


def simulate(ious: dict[str, Sequence[float]], held_out: Sequence[int], zs: Sequence[float], draws: int,
             default: str = "vote", seed: int = 0) -> dict[float, dict[str, float]]:
    """The variant choice on ``k`` random held-out boxes, judged on the others (module docstring).

    Args:
        ious: variant → IoU per box (same boxes, same order).
        held_out: the k to try (each < the number of boxes).
        zs: ``SWITCH_Z`` values.
        draws: random draws per k.
        default: the default variant.

    Returns:
        z → {``gain_k<k>``, ``gain_p5_k<k>``, ``default_share_k<k>``} (module docstring).

    Raises:
        ValueError: a k not below the number of boxes, or :func:`choose_variant`'s errors.
    """
    arr = {name: np.asarray(v, np.float64) for name, v in ious.items()}
    n = len(arr[default])
    rng = np.random.default_rng(seed)
    out: dict[float, dict[str, float]] = {z: {} for z in zs}
    for k in held_out:
        if not 0 < k < n:
            raise ValueError(f"{k} held-out masks out of {n} boxes: need 0 < k < {n}")
        splits = [rng.permutation(n) for _ in range(draws)]
        for z in zs:
            gains, kept = [], 0
            for idx in splits:
                a, b = idx[:k], idx[k:]
                pick = choose_variant({name: v[a] for name, v in arr.items()}, default, z)
                gains.append(arr[pick][b].mean() - arr[default][b].mean())
                kept += pick == default
            out[z].update({f"gain_k{k}": float(np.mean(gains)), f"gain_p5_k{k}": float(np.percentile(gains, 5)),
                           f"default_share_k{k}": kept / draws})
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m training.gate_benchmark``; returns 0, or 2 on bad arguments."""
    p = argparse.ArgumentParser(prog="python -m training.gate_benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, type=Path, help="dataset folder (train/val splits)")
    p.add_argument("--run", required=True, type=Path, help="a training.curve run folder")
    p.add_argument("--iteration", type=int, default=None, help="its checkpoint (default: model_final.pth's)")
    p.add_argument("--held-out", default="10,25,50,100", help="numbers of held-out masks")
    p.add_argument("--z", default="0,1,2", help="RETRAIN.GATE.SWITCH_Z values")
    p.add_argument("--draws", type=int, default=2000, help="random draws per number of held-out masks")
    p.add_argument("--no-write", action="store_true", help="print, do not touch docs/")
    args = p.parse_args(argv)
    try:
        _, val = dataset_splits(args.data)
        held_out = [int(x) for x in args.held_out.split(",") if x]
        zs = [float(x) for x in args.z.split(",") if x]
        iteration = args.iteration
        if iteration is None:
            iteration = json.loads((args.run / "train_result.json").read_text())["iterations"]
        ious = per_box_ious(args.run, iteration, args.data)
        n = len(ious["vote"])
        rows = simulate(ious, [k for k in held_out if k < n], zs, args.draws)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    key = f"gate-{args.data.resolve().name}-{val.name}"
    command = "python -m training.gate_benchmark " + shlex.join(argv if argv is not None else sys.argv[1:])
    means = {name: float(np.mean(v)) for name, v in ious.items()}
    print(f"[gate] {key}: {n} boxes; " + ", ".join(f"{k} {v:.4f}" for k, v in means.items()))
    for z, figs in rows.items():
        print(f"[gate] z={z:g}: " + ", ".join(f"{k} {v:+.4f}" for k, v in figs.items()))
    if not args.no_write:
        record_results(key, "variants", {f"mIoU_{k}": v for k, v in means.items()} | {"n_boxes": n,
                                                                                       "iteration": iteration},
                       command)
        for z, figs in rows.items():
            record_results(key, f"z{z:g}", figs, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
