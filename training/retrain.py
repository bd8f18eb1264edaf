"""Retrain SIM on a live Label Studio project and publish the new model version.

Usage::

    python -m training.retrain --project 12 [--url http://localhost:8080 --api-key TOKEN]
        [--model-dir models] [--config configs/SIM_close_EffLite0_FPN_cpu.yaml] [--max-iter 2000]
        [--tolerance 0.02] [--dry-run] [--cache-dir DIR] [--timeout 30] [KEY VALUE ...]

URL and key default to the environment (``LABEL_STUDIO_URL``, ``LABEL_STUDIO_API_KEY``), the model
directory to ``MODEL_DIR`` (else ``./models``). Trailing ``KEY VALUE`` pairs override config keys.

Steps (:class:`RetrainJob`; one progress line each, prefixed ``[retrain]``; the training loop prints its
own progress):

1. lock — take the project's retrain lock (:class:`sim_model.registry.ProjectLock`) and one of the
   ``MAX_CONCURRENT_RETRAINS`` retrain slots (:func:`sim_model.registry.acquire_slot`), or adopt the ones
   handed over by the backend's webhook (``--lock-fd``, ``--slot-fd``);
2. export — tasks, latest annotations and images (incremental cache) (:mod:`training.ls_export`); the
   class map is extended (stable ids);
3. dataset — COCO json: ``train.json`` (boxes; the annotators' masks that are not held out supervise
   their instance), ``val.json`` (the held-out share ``RETRAIN.VAL_MASK_FRACTION`` of the annotators'
   masks, always the same ones: :func:`training.coco.held_out`); ``--dry-run`` stops here and prints
   the figures;
4. train — the full SIM pipeline (:func:`training.train.train`), continued from the current version's
   checkpoint (iteration, optimizer, teacher, prototypes: warm-ups are not restarted), or from the base
   weights of the config on the first run. Iterations: :func:`retrain_schedule` from the number of
   annotated images (``RETRAIN.EPOCHS``, ``MIN_ITER``, ``MAX_ITER``; ``--max-iter`` overrides), the LR
   dropping at ``RETRAIN.LR_STEPS`` of them; a continuation takes these, the colour steps' keys and the weight
   of the annotators' masks from the recipe (:data:`RECIPE_NODES`), the rest from the current version's config
   (:func:`follow_recipe`). When the class map has grown
   since the current version, only its weights are loaded, the class rows grown
   (:func:`sim_model.checkpoint.grow_class_rows`), and the schedule restarts;
5. evaluate — box→mask mIoU and AP on the held-out masks, for the new version's map alone and with each
   combination of its colour steps (refined by GrabCut, voting with GrabCut), for GrabCut and for the
   engine served now, on the same masks (:func:`training.publish.validate_against_served`); the version
   serves ``RETRAIN.GATE.DEFAULT_VARIANT`` (the vote) unless another variant beats it significantly on
   those masks (:func:`training.publish.choose_variant`), and the default when the project has none;
6. publish — write the version (:func:`training.publish.write_version`) and switch ``CURRENT`` if the
   quality gate passes (:meth:`sim_model.registry.ModelRegistry.publish`, ``--tolerance``): the best of
   the new version (served as its chosen variant, ``model_version`` e.g. ``sim-v0004+vote``), the
   served engine and GrabCut serves;
7. scores — S_k of every box of the project with the new version into ``scores.sqlite``
   (:func:`training.scores.compute_scores`).

Exit codes:

==  ======================================================================================
0   new version published (or ``--dry-run`` finished)
1   unexpected error (traceback printed); the served version is unchanged
2   usage error (bad arguments)
3   another retrain of this project is running, or MAX_CONCURRENT_RETRAINS retrains are (lock held)
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
import math
import os
import shutil
import sys
import time
import traceback
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from detectron2.config import CfgNode

from sim_backend.label_studio import LabelStudioConnection, LabelStudioError
from sim_backend.settings import Settings, SettingsError
from sim_backend.tasks import parse_project_id
from sim_model.checkpoint import checkpoint_iteration, grow_class_rows
from sim_model.datasets import REPO_ROOT
from sim_model.engines import version_engine
from sim_model.registry import (CLASSES_FILE, CONFIG_FILE, TEACHER_WEIGHTS_FILE, WEIGHTS_FILE, LockHeld,
                                ModelRegistry, ProjectLock, acquire_slot, adopt_lock, adopt_slot, jsonable,
                                read_classes, served_variant_steps)
from training import ls_export
from training.publish import validate_against_served, write_version
from training.score_store import ScoreDB
from training.scores import compute_scores
from training.train import build_config, train

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_LOCKED = 3
EXIT_LABEL_STUDIO = 4
EXIT_NO_DATA = 5
EXIT_TRAIN_FAILED = 6
EXIT_SCORES_FAILED = 7
EXIT_NOT_PUBLISHED = 10

DEFAULT_CONFIG = "configs/SIM_close_EffLite0_FPN_cpu.yaml"
DEFAULT_TOLERANCE = 0.02
STEPS = 7


def _misa_changed(parent_config: Path, config_file: Path, opts: Sequence[str]) -> bool:
    """Whether this retrain's MISA switches (``MODEL.MISA.ENABLED``, ``FSD.ENABLED``) or the FSD projector's
    shapes (``FSD.PROJECTOR_CHANNELS``, ``MODEL.BSSS.FEATURE_DIM``) differ from the parent version's: then its
    optimizer state does not fit the network's parameters."""
    def switches(cfg: CfgNode) -> tuple:
        m = cfg.MODEL.MISA
        fsd = bool(m.ENABLED and m.FSD.ENABLED)
        # the FSD projector's shapes come with FSD
        return bool(m.ENABLED), fsd, (int(m.FSD.PROJECTOR_CHANNELS), int(cfg.MODEL.BSSS.FEATURE_DIM)) if fsd else None

    return switches(build_config(str(parent_config))) != switches(build_config(str(config_file), list(opts)))


def retrain_schedule(cfg: CfgNode, n_images: int, start_iter: int = 0,
                     iterations: int | None = None) -> tuple[int, tuple[int, ...]]:
    """How long one retrain trains: ``RETRAIN.EPOCHS`` passes over the annotated images at
    ``SOLVER.IMS_PER_BATCH`` images per step, clamped to [``RETRAIN.MIN_ITER``, ``RETRAIN.MAX_ITER``].

    Args:
        cfg: the run's config.
        n_images: annotated images with at least one box.
        start_iter: the iteration the run continues from (0 for a new schedule).
        iterations: this many iterations instead (``--max-iter``).

    Returns:
        (``SOLVER.MAX_ITER``, ``SOLVER.STEPS``): absolute iterations; the LR drops at the fractions
        ``RETRAIN.LR_STEPS`` of this retrain's iterations (a drop that would fall on its last step is left
        out: detectron2 refuses it).

    Raises:
        ValueError: ``n_images`` < 0, or MIN_ITER > MAX_ITER.
    """
    r = cfg.RETRAIN
    if n_images < 0 or r.MIN_ITER > r.MAX_ITER:
        raise ValueError(f"need n_images >= 0 and RETRAIN.MIN_ITER <= MAX_ITER, got {n_images}, "
                         f"{r.MIN_ITER}, {r.MAX_ITER}")
    n = int(math.ceil(float(r.EPOCHS) * n_images / max(int(cfg.SOLVER.IMS_PER_BATCH), 1)))
    n = min(max(n, int(r.MIN_ITER)), int(r.MAX_ITER)) if iterations is None else int(iterations)
    steps = sorted({max(1, int(round(f * n))) for f in r.LR_STEPS})
    return start_iter + n, tuple(start_iter + k for k in steps if k < n)  # a drop at the last step is no drop


#: Config nodes that a continued retrain takes from the recipe (``--config`` or :data:`DEFAULT_CONFIG`, with the
#: ``KEY VALUE`` overrides), not from the served version's config.yaml: the retrain's policy, the colour steps'
#: settings and the weight of the annotators' masks are not learned, so a changed default (e.g.
#: ``RETRAIN.MAX_ITER``, ``MODEL.MASK_SUPERVISION.WEIGHT``) reaches projects that already have versions.
RECIPE_NODES = ("RETRAIN", "TEST.REFINE", "TEST.VOTE", "MODEL.MASK_SUPERVISION")


def follow_recipe(cfg: CfgNode, recipe: CfgNode) -> None:
    """Replace :data:`RECIPE_NODES` of ``cfg`` (defrosted) with copies of the recipe's.

    Args:
        cfg: the run's config, built from the served version's config.yaml; modified in place.
        recipe: the recipe's config with the run's overrides.
    """
    for path in RECIPE_NODES:
        *parents, leaf = path.split(".")
        dst, src = cfg, recipe
        for name in parents:
            dst, src = dst[name], src[name]
        dst[leaf] = src[leaf].clone()


class RetrainFailed(RuntimeError):
    """A step failed: the run ends with ``code`` (module docstring) and this message."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


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


def say(step: int | None, msg: str) -> None:
    """One ``[retrain] k/7`` progress line on stdout."""
    print((f"[retrain] {step}/{STEPS} " if step else "[retrain] ") + msg, flush=True)


@dataclass
class Trained:
    """What step 4 produced: the config, :func:`training.train.train`'s result, the final checkpoint."""

    cfg: CfgNode
    result: dict
    weights: Path
    teacher: tuple[Path, Path] | None = None   # MISA's BSSS teacher (config.yaml, checkpoint)


@dataclass
class RetrainJob:
    """One retrain of one project (module docstring); :meth:`run` returns the exit code.

    Attributes:
        project: Label Studio project id.
        registry: the model registry.
        settings: the product settings (image loader limits, thresholds).
        url, api_key: Label Studio.
        config: detectron2 YAML for a first version (None: :data:`DEFAULT_CONFIG`; later versions continue
            from the current version's own ``config.yaml``).
        max_iter: iterations of this retrain (None: :func:`retrain_schedule`).
        tolerance: largest allowed drop of validation mIoU against the served engine.
        dry_run: stop after the dataset.
        cache_dir: image cache root.
        timeout: seconds per Label Studio request.
        scores: compute S_k of every box (step 7).
        opts: KEY VALUE config overrides.
    """

    project: str
    registry: ModelRegistry
    settings: Settings
    url: str
    api_key: str
    cache_dir: Path
    config: Path | None = None
    max_iter: int | None = None
    tolerance: float = DEFAULT_TOLERANCE
    dry_run: bool = False
    timeout: float = 30.0
    scores: bool = True
    opts: list[str] = field(default_factory=list)

    @property
    def served_name(self) -> str:
        """The project's served version (e.g. ``"v0003"``), or ``"the cold-start engine"`` when none is
        current; read from the registry at each access, for progress lines."""
        return self.registry.current_version(self.project) or "the cold-start engine"

    def run(self) -> int:
        """Steps 2–7 (the caller holds the lock); returns the exit code."""
        t_start = time.time()
        say(1, f"project {self.project}: lock held; model dir {self.registry.root}; serving {self.served_name}")
        removed = self.registry.remove_stale_temporaries(self.project)
        if removed:
            say(1, f"removed half-written versions left by crashed runs: {removed}")
        work = self.registry.project_dir(self.project) / f".work-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        try:
            export = self.export()
            fraction = float(build_config(str(self._config_file(export))).RETRAIN.VAL_MASK_FRACTION)
            train_json, val_json = export.write_coco(work / "dataset", fraction)
            n_val = len(export.validation_masks(fraction))
            say(3, f"dataset: {train_json} ({export.n_boxes} boxes, {export.n_masks - n_val} annotator masks "
                   f"supervising)" + (f", {val_json} ({n_val} held-out validation masks)" if val_json
                                      else ", no validation masks"))
            if self.dry_run:
                say(3, "dry run: stopping before training")
                say(None, f"done in {time.time() - t_start:.0f} s: dry run; exit {EXIT_OK}")
                return EXIT_OK
            trained = self.train(export, train_json, work)
            version, published = self.publish(export, trained, val_json, work / "train_log.txt", n_val)
        except RetrainFailed as e:
            print(f"[retrain] FAILED (exit {e.code}): {e}", file=sys.stderr, flush=True)
            return e.code
        finally:
            shutil.rmtree(work, ignore_errors=True)
        code = EXIT_OK if published else EXIT_NOT_PUBLISHED
        if self.scores and not self.score(export, version) and code == EXIT_OK:
            code = EXIT_SCORES_FAILED
        say(None, f"done in {time.time() - t_start:.0f} s: {version} "
                  f"{'serving' if published else 'kept, not served'}; exit {code}")
        return code

    # ------------------------------------------------------------------ steps
    def export(self) -> ls_export.ProjectExport:
        """Step 2: the project's tasks, annotations and images (exit 4 / 5 when impossible / empty)."""
        say(2, f"export from {self.url or '(no URL)'} (image cache {self.cache_dir / self.project})")
        try:
            connection = LabelStudioConnection(self.url, self.api_key, self.timeout)
            export = ls_export.export_project(self.project, connection, self.cache_dir, self.registry,
                                              self.settings, progress=lambda m: say(2, m))
        except LabelStudioError as e:
            raise RetrainFailed(EXIT_LABEL_STUDIO, f"export failed: {e}; {self.served_name} keeps serving") from e
        say(2, export.summary())
        if export.n_boxes == 0:
            raise RetrainFailed(EXIT_NO_DATA, f"project {self.project} has no annotated task with a box to train on")
        return export

    def train(self, export: ls_export.ProjectExport, train_json: Path, work: Path) -> Trained:
        """Step 4, its console output kept in ``work/train_log.txt`` (exit 6 when it fails)."""
        try:
            with open(work / "train_log.txt", "a") as logf:
                with redirect_stdout(_Tee(sys.stdout, logf)), redirect_stderr(_Tee(sys.stderr, logf)):
                    return self._train(export, train_json, work / "output")
        except Exception as e:
            traceback.print_exc()
            raise RetrainFailed(EXIT_TRAIN_FAILED, f"training failed: {e.__class__.__name__}: {e}; "
                                                   f"{self.served_name} keeps serving") from e

    @property
    def recipe(self) -> Path:
        """The recipe: ``--config``, else :data:`DEFAULT_CONFIG`."""
        return Path(self.config or REPO_ROOT / DEFAULT_CONFIG)

    def _config_file(self, export: ls_export.ProjectExport) -> Path:
        """The config this retrain starts from: ``--config``, else the served version's own config (when the
        project's class map still extends its classes), else :data:`DEFAULT_CONFIG`."""
        served = self.registry.current_version(self.project)
        if served is None:
            return self.recipe
        vdir = self.registry.version_dir(self.project, served)
        parent_classes = read_classes(vdir / CLASSES_FILE)
        if export.labels[: len(parent_classes)] != parent_classes:
            return self.recipe
        return self.recipe if self.config else vdir / CONFIG_FILE

    def _train(self, export: ls_export.ProjectExport, train_json: Path, out_dir: Path) -> Trained:
        """Configure the run (first version, continuation, or grown classes) and train it."""
        opts = ["DATASETS.TEST", "()", "OUTPUT_DIR", str(out_dir)]
        served = self.registry.current_version(self.project)
        resume, grown_from, parent_classes, start_iter = False, None, [], 0
        config_file = self._config_file(export)
        if served is not None:
            vdir = self.registry.version_dir(self.project, served)
            parent_classes = read_classes(vdir / CLASSES_FILE)
            if export.labels[: len(parent_classes)] != parent_classes:
                # the project's class map no longer extends the parent's (edited by hand?): ids would not match
                say(4, f"the class map does not extend {served}'s classes: starting again from {config_file}")
            elif parent_classes == export.labels and not _misa_changed(vdir / CONFIG_FILE, config_file, self.opts):
                # same classes: continue the run (iteration, optimizer, scheduler, teacher, prototypes, memory bank)
                start_iter = checkpoint_iteration(vdir / WEIGHTS_FILE) + 1
                out_dir.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(vdir / WEIGHTS_FILE, out_dir / "model_parent.pth")
                (out_dir / "last_checkpoint").write_text("model_parent.pth")
                resume = True
                say(4, f"continuing {served} from iteration {start_iter}")
            elif parent_classes == export.labels:
                # MISA switched on or off: the parameters differ (FSD projector), so the optimizer state cannot
                # be resumed; the parent's weights with a new schedule
                grown_from = vdir / WEIGHTS_FILE
                say(4, f"MISA switched since {served}: starting from its weights with a new schedule")
            else:
                # the class map grew (old ids unchanged, new ones appended): the parent's weights with its
                # class rows kept and rows for the new classes freshly initialised; new schedule
                grown_from = vdir / WEIGHTS_FILE
                say(4, f"classes grew from {len(parent_classes)} to {len(export.labels)}: starting from the weights "
                       f"of {served} (its {len(parent_classes)} classes kept) with a new schedule")
        else:
            say(4, f"first version: {config_file} with its base weights")
        # NUM_CLASSES = number of categories of train.json = the whole class map (ids stable across versions)
        cfg = build_config(str(config_file), opts + list(self.opts), train_json=str(train_json),
                           train_images=str(export.image_dir))
        cfg.defrost()
        if Path(config_file) != self.recipe:  # continuing from the served version's own config
            follow_recipe(cfg, build_config(str(self.recipe), list(self.opts)))
        if grown_from is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            report = grow_class_rows(grown_from, cfg, len(parent_classes), out_dir / "model_parent_grown.pth")
            say(4, f"grew {len(report.grown)} class-dependent tensors from {len(parent_classes)} to "
                   f"{len(export.labels)} classes" + (f"; {len(report.fresh)} tensors freshly initialised"
                                                      if report.fresh else ""))
            cfg.MODEL.WEIGHTS = str(out_dir / "model_parent_grown.pth")
        n_images = sum(1 for t in export.tasks if t.boxes)
        cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS = retrain_schedule(cfg, n_images, start_iter, self.max_iter)
        teacher = None
        if cfg.MODEL.MISA.ENABLED:
            parent_teacher = None
            if served is not None and parent_classes == export.labels:
                parent_teacher = self.registry.version_dir(self.project, served) / TEACHER_WEIGHTS_FILE
            teacher = self._train_teacher(config_file, export, train_json, out_dir.parent / "bsss",
                                          cfg.SOLVER.MAX_ITER - start_iter, parent_teacher)
            cfg.MODEL.MISA.TEACHER.CONFIG, cfg.MODEL.MISA.TEACHER.WEIGHTS = str(teacher[0]), str(teacher[1])
        cfg.freeze()
        say(4, f"training iterations {start_iter}..{cfg.SOLVER.MAX_ITER} (LR steps {list(cfg.SOLVER.STEPS)}) on "
               f"{export.n_boxes} boxes of {n_images} images ({len(export.labels)} classes, {cfg.MODEL.DEVICE})")
        result = train(cfg, resume=resume)
        final = Path(result.get("final_checkpoint") or out_dir / "model_final.pth")
        if not final.is_file() and (out_dir / "last_checkpoint").is_file():
            final = out_dir / (out_dir / "last_checkpoint").read_text().strip()
        if not final.is_file() or final.name == "model_parent.pth":
            raise FileNotFoundError(f"training wrote no new checkpoint in {out_dir}")
        return Trained(cfg, result, final, teacher)

    def _train_teacher(self, config_file: Path, export: ls_export.ProjectExport, train_json: Path, out_dir: Path,
                       instance_iters: int, parent: Path | None) -> tuple[Path, Path]:
        """MISA's BSSS teacher on the same boxes, before the instance network: the same config as a
        ``BoxSemSeg``, ``MODEL.MISA.TEACHER.SCHEDULE_FRACTION`` of the instance network's iterations (LR steps at
        ``RETRAIN.LR_STEPS``), continued from the served version's teacher when it has one for the same
        classes. Returns (its config.yaml, its checkpoint)."""
        opts = ["DATASETS.TEST", "()", "OUTPUT_DIR", str(out_dir), *self.opts, "MODEL.META_ARCHITECTURE", "BoxSemSeg"]
        cfg = build_config(str(config_file), opts, train_json=str(train_json), train_images=str(export.image_dir))
        cfg.defrost()
        iters = max(1, int(round(instance_iters * cfg.MODEL.MISA.TEACHER.SCHEDULE_FRACTION)))
        cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS = retrain_schedule(cfg, 0, 0, iters)
        # the served version's teacher, else the backbone's base weights: never the config's MODEL.WEIGHTS (an
        # instance network's checkpoint, or a scratch file of an earlier retrain)
        cfg.MODEL.WEIGHTS = str(parent) if parent is not None and parent.is_file() else ""
        cfg.freeze()
        say(4, f"MISA: BSSS teacher for {iters} iterations" + (f", continuing {parent.parent.name}'s" if
                                                               cfg.MODEL.WEIGHTS else ", from the base weights"))
        result = train(cfg, resume=False)
        return out_dir / "config.yaml", Path(result["final_checkpoint"])

    def publish(self, export: ls_export.ProjectExport, trained: Trained, val_json: Path | None,
                train_log: Path, n_val_masks: int) -> tuple[str, bool]:
        """Steps 5–6: write and validate the version, then the gate; returns (version, published)."""
        served = self.registry.current_version(self.project)
        metrics = {"project": self.project, "parent": served, "train": jsonable(trained.result),
                   "data": {"tasks": len(export.tasks), "boxes": export.n_boxes, "val_masks": n_val_masks,
                            "train_masks": export.n_masks - n_val_masks, "classes": len(export.labels),
                            "skipped": len(export.skipped)}}
        gate = trained.cfg.RETRAIN.GATE
        if val_json is None:
            metrics["engine"] = served_variant_steps(gate.DEFAULT_VARIANT)
            say(5, f"no annotator polygons: nothing to evaluate (see the publishing rule in sim_model.registry); "
                   f"the version serves RETRAIN.GATE.DEFAULT_VARIANT ({gate.DEFAULT_VARIANT})")
        validate = None if val_json is None else (
            lambda vdir, version: validate_against_served(
                vdir, version, self.registry, self.project, val_json, export.image_dir, lambda m: say(5, m),
                default_variant=gate.DEFAULT_VARIANT, switch_z=float(gate.SWITCH_Z)))
        try:
            version, metrics = write_version(self.registry, self.project, weights=trained.weights, cfg=trained.cfg,
                                             labels=export.labels, metrics=metrics, train_log=train_log,
                                             validate=validate, teacher=trained.teacher)
        except Exception as e:
            traceback.print_exc()
            raise RetrainFailed(EXIT_TRAIN_FAILED, f"writing or evaluating the new version failed: "
                                                   f"{e.__class__.__name__}: {e}; {self.served_name} keeps serving") from e
        decision = self.registry.publish(self.project, version, metrics, self.tolerance)
        say(6, ("PUBLISHED " if decision.published else "NOT PUBLISHED ") + decision.reason)
        if not decision.published:
            print(f"[retrain] not published: {decision.reason}", file=sys.stderr)
        return version, decision.published

    def score(self, export: ls_export.ProjectExport, version: str) -> bool:
        """Step 7; False (and a message) when it fails."""
        say(7, f"S_k of every box with {version}")
        try:
            # S_k is the map's (SIM Eq. 11) whatever colour steps the version serves: skip their GrabCut runs
            engine = version_engine(self.registry.version_dir(self.project, version), steps=())
            db = ScoreDB.for_project(self.registry.root, self.project)
            st = compute_scores(engine, export, version, db, progress=lambda m: say(7, m))
        except Exception as e:
            traceback.print_exc()
            print(f"[retrain] S_k failed: {e.__class__.__name__}: {e}", file=sys.stderr)
            return False
        say(7, f"S_k of {st['n_boxes']} boxes stored in {db.path} (mean {st['mean']:.3f}, median {st['median']:.3f}); "
               f"report: python -m training.scores --project {self.project} --version {version}")
        return True


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.retrain", description=__doc__.split("\n\n")[0],
                                epilog="Exit codes: 0 published, 1 error, 2 usage, 3 locked, 4 Label Studio, "
                                       "5 no data, 6 training failed, 7 scores failed, 10 not published.",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--project", required=True, type=parse_project_id, help="Label Studio project id")
    p.add_argument("--url", default=None, help="Label Studio URL (default: env LABEL_STUDIO_URL)")
    p.add_argument("--api-key", default=None, help="Label Studio API key (default: env LABEL_STUDIO_API_KEY)")
    p.add_argument("--model-dir", default=None, help="model registry root (default: env MODEL_DIR or ./models)")
    p.add_argument("--config", default=None, help=f"detectron2 YAML for the first version (default {DEFAULT_CONFIG}); "
                                                  "later versions continue from the current version's config")
    p.add_argument("--max-iter", type=int, default=None,
                   help="training iterations of this retrain (default: RETRAIN.EPOCHS over the annotated "
                        "images, within RETRAIN.MIN_ITER..MAX_ITER)")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help=f"largest allowed drop of validation mIoU vs the served engine (default {DEFAULT_TOLERANCE})")
    p.add_argument("--dry-run", action="store_true", help="export and build the dataset, then stop")
    p.add_argument("--cache-dir", default=None, help="image cache root (default: <model dir>/.cache)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per Label Studio request (default 30)")
    p.add_argument("--no-scores", action="store_true", help="skip step 7 (S_k of every box)")
    p.add_argument("--lock-fd", type=int, default=None, help=argparse.SUPPRESS)  # handed over by the webhook
    p.add_argument("--slot-fd", type=int, default=None, help=argparse.SUPPRESS)  # handed over by the webhook
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE pairs overriding config keys")
    return p


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
    try:
        settings = Settings.from_env()
    except SettingsError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    model_dir = Path(args.model_dir) if args.model_dir else Path(settings.model_dir)
    job = RetrainJob(project=args.project, registry=ModelRegistry(model_dir), settings=settings,
                     url=(args.url or settings.label_studio_url or "").rstrip("/"),
                     api_key=args.api_key or settings.label_studio_api_key,
                     cache_dir=Path(args.cache_dir) if args.cache_dir else model_dir / ls_export.DEFAULT_CACHE_SUBDIR,
                     config=Path(args.config) if args.config else None, max_iter=args.max_iter,
                     tolerance=args.tolerance, dry_run=args.dry_run, timeout=args.timeout,
                     scores=not args.no_scores, opts=list(args.opts))
    # 1. lock: the project's, then a retrain slot
    lock = slot = None
    try:
        lock = (adopt_lock(args.lock_fd, model_dir, args.project) if args.lock_fd is not None
                else ProjectLock(model_dir, args.project).acquire())
        n = settings.max_concurrent_retrains
        slot = adopt_slot(args.slot_fd, model_dir, n) if args.slot_fd is not None else acquire_slot(model_dir, n)
    except LockHeld as e:
        if lock is not None:
            lock.release()
        print(f"[retrain] FAILED (exit {EXIT_LOCKED}): {e}", file=sys.stderr, flush=True)
        return EXIT_LOCKED
    try:
        return job.run()
    except KeyboardInterrupt:
        print(f"[retrain] FAILED (exit {EXIT_ERROR}): interrupted; the served version is unchanged", file=sys.stderr)
        return EXIT_ERROR
    except Exception as e:  # last resort: never leave without saying why
        traceback.print_exc()
        print(f"[retrain] FAILED (exit {EXIT_ERROR}): {e.__class__.__name__}: {e}; the served version is unchanged",
              file=sys.stderr, flush=True)
        return EXIT_ERROR
    finally:
        slot.release()
        lock.release()


if __name__ == "__main__":
    sys.exit(main())
