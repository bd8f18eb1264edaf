"""Retrain SIM on a live Label Studio project and publish the new model version.

Usage::

    python -m training.retrain --project 12 [--url http://localhost:8080 --api-key TOKEN]
        [--model-dir models] [--config configs/SIM_EffLite0_FPN_cpu.yaml] [--max-iter 2000]
        [--tolerance 0.02] [--dry-run] [--cache-dir DIR] [--timeout 30] [KEY VALUE ...]

URL and key default to the environment (``LABEL_STUDIO_URL``, ``LABEL_STUDIO_API_KEY``), the model
directory to ``MODEL_DIR`` (else ``./models``). Trailing ``KEY VALUE`` pairs override config keys.

Steps (one progress line each, prefixed ``[retrain]``; the training loop prints its own progress):

1. lock — take the project's retrain lock (:class:`training.triggers.ProjectLock`), or adopt the one
   handed over by the webhook (``--lock-fd``);
2. export — tasks, latest annotations and images (incremental cache) with label-studio-sdk
   (:mod:`training.ls_export`); the class map is extended (stable ids);
3. dataset — COCO json: ``train.json`` (boxes only), ``val.json`` (annotator polygons as masks);
   ``--dry-run`` stops here and prints the figures;
4. train — the full SIM pipeline (:func:`training.train.train`), continued from the current version's
   checkpoint (iteration, optimizer, teacher, prototypes: warm-ups are not restarted), or from the base
   weights of the config on the first run; ``--max-iter`` more iterations. When the class map has grown
   since the current version, only its weights are loaded (the class-dependent layers are re-initialised)
   and the schedule restarts;
5. evaluate — box→mask mIoU and AP on the annotator polygons
   (:func:`sim_model.evaluation.evaluate_box_to_mask`), for the new version and for the engine served
   now (the current version, or GrabCut before the first one), on the same masks;
6. publish — write ``<model dir>/<project>/<version>/`` (model.pth, config.yaml, classes.json,
   metrics.json, train_log.txt) under a temporary name, rename it into place, and switch ``CURRENT``
   if the quality gate passes (:meth:`training.registry.ModelRegistry.publish`, ``--tolerance``);
7. scores — S_k of every box of the project with the new version into ``scores.sqlite``
   (:mod:`training.scores`).

Exit codes:

==  ======================================================================================
0   new version published (or ``--dry-run`` finished)
1   unexpected error (traceback printed); the served version is unchanged
2   usage error (bad arguments)
3   another retrain of this project is running (lock held)
4   Label Studio unreachable, refused the key or project, or stopped answering mid-way
5   nothing to train on (no annotated task with a box)
6   training or evaluation failed; no version written
7   version published, but computing S_k failed (the table lacks this version)
10  version trained and kept, but not published by the quality gate (the reason is printed)
==  ======================================================================================

In every failing case the previously served version keeps serving: ``CURRENT`` changes only in
step 6, after the new version is complete on disk.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import time
import traceback
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Sequence

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_LOCKED = 3
EXIT_LABEL_STUDIO = 4
EXIT_NO_DATA = 5
EXIT_TRAIN_FAILED = 6
EXIT_SCORES_FAILED = 7
EXIT_NOT_PUBLISHED = 10

DEFAULT_CONFIG = "configs/SIM_EffLite0_FPN_cpu.yaml"
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TOLERANCE = 0.02
STEPS = 7


class _Tee(io.TextIOBase):
    """Write to several text streams (the console and the version's train_log.txt)."""

    def __init__(self, *streams):
        self.streams = streams

    def write(self, s):
        for st in self.streams:
            try:
                st.write(s)
                st.flush()
            except ValueError:  # a closed stream
                pass
        return len(s)

    def flush(self):
        for st in self.streams:
            try:
                st.flush()
            except ValueError:
                pass


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.retrain", description=__doc__.split("\n\n")[0],
                                epilog="Exit codes: 0 published, 1 error, 2 usage, 3 locked, 4 Label Studio, "
                                       "5 no data, 6 training failed, 7 scores failed, 10 not published.",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--project", required=True, type=int, help="Label Studio project id")
    p.add_argument("--url", default=None, help="Label Studio URL (default: env LABEL_STUDIO_URL)")
    p.add_argument("--api-key", default=None, help="Label Studio API key (default: env LABEL_STUDIO_API_KEY)")
    p.add_argument("--model-dir", default=None, help="model registry root (default: env MODEL_DIR or ./models)")
    p.add_argument("--config", default=None, help=f"detectron2 YAML for the first version (default {DEFAULT_CONFIG}); "
                                                  "later versions continue from the current version's config")
    p.add_argument("--max-iter", type=int, default=None,
                   help="training iterations of this retrain (default: the config's SOLVER.MAX_ITER)")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help=f"largest allowed drop of validation mIoU vs the served engine (default {DEFAULT_TOLERANCE})")
    p.add_argument("--dry-run", action="store_true", help="export and build the dataset, then stop")
    p.add_argument("--cache-dir", default=None, help="image cache root (default: <model dir>/.cache)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per Label Studio request (default 30)")
    p.add_argument("--no-scores", action="store_true", help="skip step 7 (S_k of every box)")
    p.add_argument("--lock-fd", type=int, default=None, help=argparse.SUPPRESS)  # handed over by training.triggers
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE pairs overriding config keys")
    return p


def _say(step: int | None, msg: str) -> None:
    prefix = f"[retrain] {step}/{STEPS} " if step else "[retrain] "
    print(prefix + msg, flush=True)


def _fail(code: int, msg: str) -> int:
    print(f"[retrain] FAILED (exit {code}): {msg}", file=sys.stderr, flush=True)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m training.retrain``; returns the exit code (module docstring)."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    if args.max_iter is not None and args.max_iter < 1:
        print("error: --max-iter must be >= 1", file=sys.stderr)
        return EXIT_USAGE
    if len(args.opts) % 2:
        print(f"error: config overrides must be KEY VALUE pairs, got {args.opts}", file=sys.stderr)
        return EXIT_USAGE
    from sim_backend.settings import Settings, SettingsError

    from training.registry import ModelRegistry
    from training.triggers import LockHeld, ProjectLock, adopt_lock

    try:
        settings = Settings.from_env()
    except SettingsError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    model_dir = Path(args.model_dir) if args.model_dir else Path(settings.model_dir)
    url = (args.url or settings.label_studio_url or "").rstrip("/")
    key = args.api_key or settings.label_studio_api_key
    registry = ModelRegistry(model_dir)
    project = args.project

    # 1. lock
    try:
        lock = (adopt_lock(args.lock_fd, model_dir, project) if args.lock_fd is not None
                else ProjectLock(model_dir, project).acquire())
    except LockHeld as e:
        return _fail(EXIT_LOCKED, str(e))
    try:
        return _run(args, settings, registry, model_dir, url, key, project)
    except KeyboardInterrupt:
        return _fail(EXIT_ERROR, "interrupted; the served version is unchanged")
    except Exception as e:  # last resort: never leave without saying why
        traceback.print_exc()
        return _fail(EXIT_ERROR, f"{e.__class__.__name__}: {e}; the served version is unchanged")
    finally:
        lock.release()


def _run(args, settings, registry, model_dir: Path, url: str, key: str, project: int) -> int:
    from training import ls_export

    t_start = time.time()
    served = registry.current_version(project)
    _say(1, f"project {project}: lock held; model dir {model_dir}; serving {served or 'the cold-start engine'}")
    removed = registry.remove_stale_temporaries(project)
    if removed:
        _say(1, f"removed half-written versions left by crashed runs: {removed}")

    # 2. export
    cache = Path(args.cache_dir) if args.cache_dir else model_dir / ls_export.DEFAULT_CACHE_SUBDIR
    _say(2, f"export from {url or '(no URL)'} (image cache {cache / str(project)})")
    try:
        export = ls_export.export_project(project, url, key, cache, registry, settings, timeout=args.timeout,
                                          progress=lambda m: _say(2, m))
    except ls_export.ExportError as e:
        return _fail(EXIT_LABEL_STUDIO, f"export failed: {e}; {served or 'the cold-start engine'} keeps serving")
    _say(2, export.summary())
    if export.n_boxes == 0:
        return _fail(EXIT_NO_DATA, f"project {project} has no annotated task with a box to train on")

    # 3. dataset
    work = registry.project_dir(project) / f".work-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        train_json, val_json = export.write_coco(work / "dataset")
        _say(3, f"dataset: {train_json} ({export.n_boxes} boxes)"
             + (f", {val_json} ({export.n_masks} validation masks)" if val_json else ", no validation masks"))
        if args.dry_run:
            _say(3, "dry run: stopping before training")
            _say(None, f"done in {time.time() - t_start:.0f} s: dry run; exit {EXIT_OK}")
            return EXIT_OK
        return _train_publish(args, settings, registry, project, export, train_json, val_json, work, served, t_start)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _train_publish(args, settings, registry, project, export, train_json: Path, val_json: Path | None,
                   work: Path, served: str | None, t_start: float) -> int:
    log_path = work / "train_log.txt"
    # 4. train (its console output is also kept in the version's train_log.txt)
    out_dir = work / "output"
    try:
        with open(log_path, "a") as logf:
            tee_out, tee_err = _Tee(sys.stdout, logf), _Tee(sys.stderr, logf)
            with redirect_stdout(tee_out), redirect_stderr(tee_err):
                cfg, train_result, final_weights = _train(args, registry, project, export, train_json, out_dir,
                                                          served)
    except Exception as e:
        traceback.print_exc()
        return _fail(EXIT_TRAIN_FAILED, f"training failed: {e.__class__.__name__}: {e}; "
                                        f"{served or 'the cold-start engine'} keeps serving")

    return _finish(args, registry, project, export, cfg, train_result, final_weights, val_json, log_path, served,
                   t_start)


def _finish(args, registry, project, export, cfg, train_result, final_weights: Path, val_json: Path | None,
            log_path: Path, served: str | None, t_start: float) -> int:
    """Steps 5-7: write the version under a temporary name, evaluate it, rename, publish, score."""
    from sim_model.evaluation import evaluate_box_to_mask
    from training import scores as scores_mod


    try:
        with registry.create_version(project) as (version, vdir):
            shutil.copyfile(final_weights, vdir / "model.pth")
            (vdir / "config.yaml").write_text(cfg.dump())
            (vdir / "classes.json").write_text(json.dumps({"labels": export.labels}, indent=2))
            metrics = {"version": version, "project": project, "parent": served,
                       "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       "train": _jsonable(train_result),
                       "data": {"tasks": len(export.tasks), "boxes": export.n_boxes, "val_masks": export.n_masks,
                                "classes": len(export.labels), "skipped": len(export.skipped)}}
            if val_json is not None:
                _say(5, f"evaluating {version} on {export.n_masks} annotator polygons")
                engine = _load_engine(vdir, version)
                metrics["val"] = _summary(evaluate_box_to_mask(engine, val_json, export.image_dir, progress=False))
                base_engine = _served_engine(registry, project, served)
                _say(5, f"evaluating the served engine ({base_engine.model_version}) on the same polygons")
                metrics["baseline"] = _summary(evaluate_box_to_mask(base_engine, val_json, export.image_dir,
                                                                    progress=False))
                metrics["baseline"]["version"] = served
                _say(5, f"{version}: mIoU {metrics['val']['mIoU']:.4f}, AP {metrics['val']['AP']:.1f}; "
                        f"served: mIoU {metrics['baseline']['mIoU']:.4f}, AP {metrics['baseline']['AP']:.1f}")
            else:
                _say(5, "no annotator polygons: nothing to evaluate (see the publishing rule in training.registry)")
            (vdir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
            if Path(log_path).is_file():
                shutil.copyfile(log_path, vdir / "train_log.txt")
            else:
                (vdir / "train_log.txt").write_text("")
    except Exception as e:
        traceback.print_exc()
        return _fail(EXIT_TRAIN_FAILED, f"writing or evaluating the new version failed: {e.__class__.__name__}: "
                                        f"{e}; {served or 'the cold-start engine'} keeps serving")
    decision = registry.publish(project, version, metrics, args.tolerance)
    _say(6, ("PUBLISHED " if decision.published else "NOT PUBLISHED ") + decision.reason)

    # 7. S_k of every box with the new version
    code = EXIT_OK if decision.published else EXIT_NOT_PUBLISHED
    if not args.no_scores:
        try:
            engine = _load_engine(registry.version_dir(project, version), version)
            db = scores_mod.ScoreDB.for_project(registry.root, project)
            st = scores_mod.compute_scores(engine, export, version, db, progress=lambda m: _say(7, m))
            _say(7, f"S_k of {st['n_boxes']} boxes stored in {db.path} (mean {st['mean']:.3f}, "
                    f"median {st['median']:.3f}); report: python -m training.scores --project {project} "
                    f"--version {version}")
        except Exception as e:
            traceback.print_exc()
            print(f"[retrain] S_k failed: {e.__class__.__name__}: {e}", file=sys.stderr)
            if code == EXIT_OK:
                code = EXIT_SCORES_FAILED
    _say(None, f"done in {time.time() - t_start:.0f} s: {version} "
               f"{'serving' if decision.published else 'kept, not served'}; exit {code}")
    if code == EXIT_NOT_PUBLISHED:
        print(f"[retrain] not published: {decision.reason}", file=sys.stderr)
    return code


def _train(args, registry, project, export, train_json: Path, out_dir: Path, served: str | None):
    """Configure and run the training; returns (cfg, train() result, path of the final checkpoint)."""
    import torch

    from training.train import build_config, train

    opts = ["DATASETS.TEST", "()", "OUTPUT_DIR", str(out_dir)]
    resume = False
    grown_from: Path | None = None
    parent_classes: list[str] = []
    if served is not None:
        vdir = registry.version_dir(project, served)
        config_file = Path(args.config) if args.config else vdir / "config.yaml"
        parent_classes = json.loads((vdir / "classes.json").read_text())["labels"]
        ckpt = torch.load(vdir / "model.pth", map_location="cpu", weights_only=False)
        start_iter = int(ckpt.get("iteration", -1)) + 1 if isinstance(ckpt, dict) else 0
        del ckpt
        if export.labels[: len(parent_classes)] != parent_classes:
            # the project's class map no longer extends the parent's (edited by hand?): ids would not match
            config_file = Path(args.config) if args.config else REPO_ROOT / DEFAULT_CONFIG
            start_iter = 0
            _say(4, f"the class map does not extend {served}'s classes: starting again from {config_file}")
        elif parent_classes == export.labels:
            # same classes: continue the run (iteration, optimizer, scheduler, teacher, prototypes, memory bank)
            out_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(vdir / "model.pth", out_dir / "model_parent.pth")
            (out_dir / "last_checkpoint").write_text("model_parent.pth")
            resume = True
            _say(4, f"continuing {served} from iteration {start_iter}")
        else:
            # the class map grew (old ids unchanged, new ones appended): start from the parent's weights with
            # its class-dependent rows kept and rows for the new classes freshly initialised; new schedule
            grown_from = vdir / "model.pth"
            start_iter = 0
            _say(4, f"classes grew from {len(parent_classes)} to {len(export.labels)}: starting from the weights "
                    f"of {served} (its {len(parent_classes)} classes kept) with a new schedule")
    else:
        config_file = Path(args.config) if args.config else REPO_ROOT / DEFAULT_CONFIG
        start_iter = 0
        _say(4, f"first version: {config_file} with its base weights")
    # NUM_CLASSES = number of categories of train.json = the whole class map (ids stable across versions)
    cfg = build_config(str(config_file), opts + list(args.opts), train_json=str(train_json),
                       train_images=str(export.image_dir))
    if grown_from is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        weights = grow_classes(grown_from, cfg, len(parent_classes), out_dir / "model_parent_grown.pth")
        cfg.defrost()
        cfg.MODEL.WEIGHTS = str(weights)
        cfg.freeze()
    n_iter = args.max_iter if args.max_iter is not None else int(cfg.SOLVER.MAX_ITER)
    cfg.defrost()
    cfg.SOLVER.MAX_ITER = start_iter + n_iter
    cfg.freeze()
    _say(4, f"training iterations {start_iter}..{cfg.SOLVER.MAX_ITER} on {export.n_boxes} boxes "
            f"({len(export.labels)} classes, {cfg.MODEL.DEVICE})")
    result = train(cfg, resume=resume)
    final = Path(result.get("final_checkpoint") or out_dir / "model_final.pth")
    if not final.is_file():
        last = out_dir / "last_checkpoint"
        if last.is_file():
            final = out_dir / last.read_text().strip()
    if not final.is_file() or final.name == "model_parent.pth":
        raise FileNotFoundError(f"training wrote no new checkpoint in {out_dir}")
    return cfg, result, final


def grow_classes(parent_ckpt: Path, cfg, n_old: int, out_path: Path) -> Path:
    """Weights for a network with more classes, from a parent checkpoint with the first ``n_old`` of them.

    Class ids are stable (new labels are appended to the class map), so every class-dependent tensor
    (classification logits, prototypes, for the student and its momentum teacher) keeps the parent's
    rows ``[:n_old]``; the rows of the new classes take the freshly built network's initialisation.
    Tensors of the same shape are copied; anything else keeps the new initialisation.

    Args:
        parent_ckpt: the parent version's ``model.pth`` (detectron2 checkpoint with ``"model"``).
        cfg: the new config (``MODEL.FCOS.NUM_CLASSES`` = new class count).
        n_old: the parent's class count.
        out_path: where to write the weights-only checkpoint (``{"model": state_dict}``).

    Returns:
        ``out_path``.
    """
    import torch
    from detectron2.modeling import build_model

    import sim_model.modeling  # noqa: F401  (registers CondInst)

    n_new = int(cfg.MODEL.FCOS.NUM_CLASSES)
    new_sd = build_model(cfg).state_dict()
    old_sd = torch.load(parent_ckpt, map_location="cpu", weights_only=False)["model"]
    out, grown, fresh = {}, [], []
    for k, ref in new_sd.items():
        v = old_sd.get(k)
        if v is None and k.startswith("teacher.model."):
            v = old_sd.get("net." + k[len("teacher.model."):])
        if v is None or not hasattr(v, "shape"):
            out[k] = ref if v is None else v
            if v is None:
                fresh.append(k)
            continue
        if tuple(v.shape) == tuple(ref.shape):
            out[k] = v
        elif (t := _grow_rows(v, ref, n_old, n_new)) is not None:
            out[k] = t
            grown.append(k)
        else:
            out[k] = ref
            fresh.append(k)
    # the momentum teacher (SIM §3.4) is a copy of the network ("teacher.model.<key>" mirrors "net.<key>"),
    # created when training starts; carry its state over the same way
    for k, v in old_sd.items():
        if k in out or not k.startswith("teacher."):
            continue
        ref = new_sd.get("net." + k[len("teacher.model."):]) if k.startswith("teacher.model.") else None
        if ref is None or not hasattr(v, "shape") or tuple(v.shape) == tuple(ref.shape):
            out[k] = v
        elif (t := _grow_rows(v, ref, n_old, n_new)) is not None:
            out[k] = t
            grown.append(k)
    _say(4, f"grew {len(grown)} class-dependent tensors from {n_old} to {n_new} classes"
            + (f"; {len(fresh)} tensors freshly initialised" if fresh else ""))
    torch.save({"model": out}, out_path)
    return out_path


def _grow_rows(old, ref, n_old: int, n_new: int):
    """A class-dependent tensor grown from ``n_old`` to ``n_new`` classes along dim 0: the old rows of ``old``
    on top of ``ref``'s fresh rows; None when ``old`` is not such a tensor (other shape)."""
    if old.dim() >= 1 and old.shape[0] == n_old and ref.shape[0] == n_new and old.shape[1:] == ref.shape[1:]:
        t = ref.clone()
        t[:n_old] = old.to(t.dtype)
        return t
    return None


def _load_engine(vdir: Path, version: str):
    from sim_model.box_to_mask import sim_model_version
    from sim_model.engines.sim import SIMBoxToMask

    engine = SIMBoxToMask.from_version_dir(vdir)
    engine.model_version = sim_model_version(version)
    return engine


def _served_engine(registry, project, served: str | None):
    """The engine the backend serves now: the current version, or the cold-start GrabCut."""
    if served is None:
        from sim_model.engines.grabcut import GrabCutBoxToMask

        return GrabCutBoxToMask()
    return _load_engine(registry.version_dir(project, served), served)


def _summary(ev: dict) -> dict:
    """The figures of an evaluation worth storing (drops per-box lists), plus ``n_masks``."""
    out = {k: v for k, v in ev.items() if k not in ("per_box", "skipped")}
    out["n_masks"] = int(ev.get("n_boxes", 0))
    out["n_skipped"] = len(ev.get("skipped", []))
    return _jsonable(out)


def _jsonable(o):
    try:
        return json.loads(json.dumps(o, default=lambda x: x.item() if hasattr(x, "item") else str(x)))
    except (TypeError, ValueError):
        return str(o)


if __name__ == "__main__":
    sys.exit(main())
