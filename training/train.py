"""Train the CondInst + BoxInst (+ SIM, + MISA) network, or MISA's BSSS teacher, on any COCO-format dataset (detectron2 training loop).

Command line::

    python -m training.train --config configs/SIM_EffLite0_FPN_cpu.yaml \\
        [--train-json J --train-images D] [--val-json J --val-images D] \\
        [--num-gpus N] [--num-machines M --machine-rank R --dist-url URL] [--resume] [--threads T] \\
        [KEY VALUE ...]

Multi-GPU / multi-machine runs go through detectron2's ``launch`` (DDP). Progress lines (iteration,
losses, ETA) go to the log, metrics to ``OUTPUT_DIR/metrics.json`` and TensorBoard event files.

Python API (used by ``training.retrain``)::

    cfg = build_config("configs/SIM_EffLite0_FPN_cpu.yaml", ["OUTPUT_DIR", "out/run1"])
    result = train(cfg, resume=False)   # {"metrics": {...}, "final_checkpoint": ".../model_final.pth", ...}

A checkpoint (``DetectionCheckpointer``) holds the model (student, teacher, prototypes, the
``iteration`` buffer that drives the warm-ups), the optimizer, the LR scheduler, the trainer's
iteration and the copy-paste memory bank, so ``--resume`` continues exactly where a run stopped.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from typing import Optional, Sequence

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, hooks, launch
from detectron2.evaluation import COCOEvaluator, print_csv_format
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

import sim_model.condinst  # noqa: F401  (registers CondInst and the backbones)
from sim_model.config import get_sim_cfg
from sim_model.datasets import coco_mini_dir, split_files
from sim_model.evaluation import most_per_image
from sim_model.misa.bsss import SemanticMIoUEvaluator
from training.data import BoxOnlyDatasetMapper, register_coco

logger = logging.getLogger("training.train")


def register_builtin_datasets() -> None:
    """Register ``coco_mini_train2017`` / ``coco_mini_val2017`` (the configs' default datasets) when the
    shared coco-mini data exists (:func:`sim_model.datasets.coco_mini_dir`)."""
    for split in ("train2017", "val2017"):
        j, d = split_files(coco_mini_dir(), split)
        if j.is_file() and d.is_dir():
            register_coco(f"coco_mini_{split}", str(j), str(d))


def dataset_name(prefix: str, json_file: str, image_root: str) -> str:
    """A detectron2 dataset name for a (json, image folder) pair: ``<prefix>_<sha1 of both paths>``."""
    h = hashlib.sha1(f"{os.path.abspath(json_file)}|{os.path.abspath(image_root)}".encode()).hexdigest()[:10]
    return f"{prefix}_{h}"


def num_categories(json_file: str) -> int:
    """Number of categories of a COCO json (= ``MODEL.FCOS.NUM_CLASSES`` for it)."""
    with open(json_file, encoding="utf-8") as f:
        return len(json.load(f)["categories"])


def build_config(config_file: str, opts: Optional[Sequence[str]] = None, *, train_json: Optional[str] = None,
                 train_images: Optional[str] = None, val_json: Optional[str] = None,
                 val_images: Optional[str] = None) -> CfgNode:
    """detectron2 config: defaults + :func:`add_sim_config` + ``config_file`` + ``opts`` (KEY VALUE list).

    MISA's teacher files (``MODEL.MISA.TEACHER.CONFIG/WEIGHTS``) given relative to the config's folder (as a
    version's config names them) are made absolute.

    With ``train_json``/``train_images`` the dataset is registered and becomes ``DATASETS.TRAIN``, and
    ``MODEL.FCOS.NUM_CLASSES`` is set to its number of categories (``opts`` are applied after, so an
    explicit ``MODEL.FCOS.NUM_CLASSES`` wins); ``val_json``/``val_images`` likewise set ``DATASETS.TEST``,
    and raise ``MODEL.FCOS.POST_NMS_TOPK_TEST`` to the most instances of one val image when that is more
    (375 nuclei on a dsb2018-nuclei val image): the network and COCOeval (:meth:`Trainer.build_evaluator`)
    then keep them all (``opts`` again win).

    Raises:
        FileNotFoundError: a given file or folder does not exist.
        ValueError: only one of a json/images pair is given.
    """
    register_builtin_datasets()
    cfg = get_sim_cfg()
    cfg.merge_from_file(config_file)
    if not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    if (train_json is None) != (train_images is None) or (val_json is None) != (val_images is None):
        raise ValueError("give both --train-json and --train-images (and both --val-json and --val-images)")
    if train_json is not None:
        name = register_coco(dataset_name("train", train_json, train_images), train_json, train_images)
        cfg.DATASETS.TRAIN = (name,)
        cfg.MODEL.FCOS.NUM_CLASSES = num_categories(train_json)
    if val_json is not None:
        name = register_coco(dataset_name("val", val_json, val_images), val_json, val_images)
        cfg.DATASETS.TEST = (name,)
        with open(val_json, encoding="utf-8") as f:
            most = most_per_image(json.load(f).get("annotations", []))
        cfg.MODEL.FCOS.POST_NMS_TOPK_TEST = max(cfg.MODEL.FCOS.POST_NMS_TOPK_TEST, most)
    if opts:
        cfg.merge_from_list(list(opts))
    _resolve_teacher_paths(cfg, os.path.dirname(os.path.abspath(config_file)))
    cfg.freeze()
    return cfg


def _resolve_teacher_paths(cfg: CfgNode, config_dir: str) -> None:
    """MISA's teacher files named relative to the config's folder (a version's ``config.yaml`` names
    ``bsss_config.yaml`` / ``bsss_model.pth`` beside it) become absolute paths; others are left as given."""
    t = cfg.MODEL.MISA.TEACHER
    for key in ("CONFIG", "WEIGHTS"):
        path = getattr(t, key)
        if path and not os.path.isabs(path) and not os.path.exists(path):
            candidate = os.path.join(config_dir, path)
            if os.path.exists(candidate):
                setattr(t, key, candidate)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


class SyncIteration(hooks.HookBase):
    """Before each step, set the model's ``iteration`` buffer to the trainer's iteration.

    The warm-ups (pairwise ramp, SIM gate) read that buffer; it is also saved in the model state, so
    both a resumed run and a run loading only the weights keep their position in the schedule.
    """

    def before_step(self):
        _unwrap(self.trainer.model).iteration.fill_(int(self.trainer.iter))


class Trainer(DefaultTrainer):
    """detectron2's ``DefaultTrainer`` with the box-only mapper, COCO evaluation and SIM state in checkpoints."""

    def __init__(self, cfg):
        """Build model, optimizer, data loader, LR scheduler and checkpointer (detectron2), and add the
        model's copy-paste memory bank to the checkpointables (when SIM's copy-paste is on).

        Args:
            cfg: from :func:`build_config` (``DATASETS.TRAIN`` registered, ``OUTPUT_DIR`` set).
        """
        super().__init__(cfg)
        bank = getattr(_unwrap(self.model), "memory_bank", None)
        if bank is not None:
            self.checkpointer.add_checkpointable("memory_bank", bank)

    def state_dict(self):
        """Trainer state for checkpoints, with the optimizer (detectron2 0.6's ``DefaultTrainer`` omits it)."""
        ret = super().state_dict()
        ret["_trainer"] = self._trainer.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        """Restore what :meth:`state_dict` saved: the iteration and the hooks' states and, when the checkpoint
        has ``"_trainer"``, the training loop's optimizer (and AMP grad-scaler) state; a checkpoint without
        it (written before the optimizer was saved) keeps the freshly built optimizer.

        Raises:
            KeyError: ``state_dict`` has no ``"iteration"`` (not a trainer state).
        """
        super().load_state_dict(state_dict)
        if "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])

    @classmethod
    def build_train_loader(cls, cfg):
        """detectron2's training loader over ``DATASETS.TRAIN`` with :class:`~training.data.BoxOnlyDatasetMapper`.

        Returns:
            An endless iterable of batches (``SOLVER.IMS_PER_BATCH`` images over all processes): lists of
            dicts with ``image`` ((3, H, W) uint8 in ``INPUT.FORMAT``, resized and flipped) and
            ``instances`` (``gt_boxes`` XYXY in pixels of that image, ``gt_classes`` int64); no masks.
        """
        return build_detection_train_loader(cfg, mapper=BoxOnlyDatasetMapper(cfg, is_train=True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        """detectron2's inference loader over the registered ``dataset_name``, one image per batch.

        Returns:
            An iterable of one-element lists of dicts with ``image`` ((3, H, W) uint8 in ``INPUT.FORMAT``,
            resized to ``INPUT.MIN_SIZE_TEST``), ``height``/``width`` (original size, px), no annotations.
        """
        return build_detection_test_loader(cfg, dataset_name, mapper=BoxOnlyDatasetMapper(cfg, is_train=False))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        """COCO bbox and segm evaluation of ``dataset_name`` (its json needs masks for segm); for the BSSS
        network (``MODEL.META_ARCHITECTURE "BoxSemSeg"``, MISA's teacher) its semantic mIoU against the masks
        (:class:`~sim_model.misa.bsss.SemanticMIoUEvaluator`, results ``{"sem_seg": {"mIoU": …}}``).

        Args:
            output_folder: where the predictions are written (default
                ``OUTPUT_DIR/inference/<dataset_name>``).

        Returns:
            A :class:`~detectron2.evaluation.COCOEvaluator` (results: AP, AP50, … in percent), gathering
            the predictions of every process, or the semantic evaluator (one process). Its detection cap
            per image (COCOeval's ``maxDets``) is the network's (``MODEL.FCOS.POST_NMS_TOPK_TEST``), at least
            COCO's 100: crowded images (375 nuclei in dsb2018) need a higher one on both sides.
        """
        if cfg.MODEL.META_ARCHITECTURE == "BoxSemSeg":
            return SemanticMIoUEvaluator(dataset_name)
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        max_dets = max(100, int(cfg.MODEL.FCOS.POST_NMS_TOPK_TEST))  # COCOeval's caps become (1, 10, this)
        return COCOEvaluator(dataset_name, tasks=("bbox", "segm"), distributed=True, output_dir=output_folder,
                             max_dets_per_image=max_dets)

    def build_hooks(self):
        """detectron2's default hooks with :class:`SyncIteration` first, so that the model's ``iteration``
        buffer is set before every other hook and step."""
        hs = super().build_hooks()
        hs.insert(0, SyncIteration())
        return hs


_LOGGING_READY = False


def _setup_logging(cfg: CfgNode) -> None:
    """detectron2's logger (progress lines) once per process, also when called through the Python API."""
    global _LOGGING_READY
    if _LOGGING_READY or logging.getLogger("detectron2").handlers:
        _LOGGING_READY = True
        return
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="detectron2")
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="training")
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="sim_model")
    _LOGGING_READY = True


def train(cfg: CfgNode, resume: bool = False) -> dict:
    """Train (in this process; use :func:`launch` for several GPUs) and evaluate on ``DATASETS.TEST``.

    Args:
        cfg: from :func:`build_config`.
        resume: continue from ``OUTPUT_DIR/last_checkpoint`` (iteration, optimizer, scheduler, teacher,
            prototypes, memory bank) if it exists; otherwise start from ``MODEL.WEIGHTS``.

    Returns:
        ``{"metrics": {task: {metric: value}} (empty without test set), "final_checkpoint": path,
        "output_dir": path, "iterations": int, "seconds": float, "last_losses": {name: value}}``.
    """
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    _setup_logging(cfg)
    if comm.is_main_process():
        with open(os.path.join(cfg.OUTPUT_DIR, "config.yaml"), "w", encoding="utf-8") as f:
            f.write(cfg.dump())
    t0 = time.time()
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=resume)
    trainer.train()
    metrics = {}
    if cfg.DATASETS.TEST and not cfg.TEST.EVAL_PERIOD:
        metrics = dict(Trainer.test(cfg, trainer.model))
    elif cfg.DATASETS.TEST:
        metrics = dict(getattr(trainer, "_last_eval_results", {}) or {})
    last_losses = {}
    try:
        storage = trainer.storage
        last_losses = {k: float(v.median(20)) for k, v in storage.histories().items() if k.startswith("loss")}
    except Exception:  # pragma: no cover - storage is always there after train()
        pass
    final = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    result = {"metrics": plain(metrics), "final_checkpoint": final, "output_dir": cfg.OUTPUT_DIR,
              "iterations": int(trainer.iter), "seconds": time.time() - t0, "last_losses": last_losses}
    if comm.is_main_process():
        with open(os.path.join(cfg.OUTPUT_DIR, "train_result.json"), "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return result


def plain(o):
    """Nested dicts of metrics as plain dicts of floats (detectron2's OrderedDicts and tensors), for JSON."""
    if isinstance(o, dict):
        return {str(k): plain(v) for k, v in o.items()}
    try:
        return float(o)
    except (TypeError, ValueError):
        return o


def _main(args) -> dict:
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    cfg = build_config(args.config_file, args.opts, train_json=args.train_json, train_images=args.train_images,
                       val_json=args.val_json, val_images=args.val_images)
    default_setup(cfg, args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            print_csv_format(res)
        return res
    return train(cfg, resume=args.resume)


def parse_args(argv: Optional[Sequence[str]] = None):
    """The command line (module docstring): detectron2's ``default_argument_parser`` plus ``--config``,
    ``--train-json``/``--train-images``, ``--val-json``/``--val-images`` and ``--threads``.

    Args:
        argv: the arguments (None: ``sys.argv[1:]``).

    Returns:
        The ``argparse.Namespace``; ``config_file`` is always set.

    Raises:
        SystemExit: status 2 on a usage error (including a missing ``--config``/``--config-file``),
            status 0 after ``--help``.
    """
    parser = default_argument_parser(epilog=__doc__)
    parser.add_argument("--config", dest="config_file", help="alias of --config-file")
    parser.add_argument("--train-json", help="COCO-format json of the training set (boxes are enough)")
    parser.add_argument("--train-images", help="image folder of the training set")
    parser.add_argument("--val-json", help="COCO-format json of the evaluation set (with masks)")
    parser.add_argument("--val-images", help="image folder of the evaluation set")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads per process (0 = torch's default). On a shared CPU use 1: "
                             "with 2 threads OpenMP spins while the other core is busy (a step was ~8x slower)")
    args = parser.parse_args(argv)
    if not args.config_file:
        parser.error("--config is required")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m training.train``: train (or ``--eval-only`` evaluate) in ``--num-gpus``
    processes through detectron2's ``launch``.

    Args:
        argv: the arguments (None: ``sys.argv[1:]``).

    Returns:
        0 once training (or the evaluation) has finished.

    Raises:
        SystemExit: status 2 on a usage error (:func:`parse_args`).
        Exception: any error of the run propagates (e.g. ``FileNotFoundError`` for a missing config,
            dataset or checkpoint, ``ValueError`` for a json/images flag given alone).
    """
    args = parse_args(argv)
    launch(_main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
    return 0


if __name__ == "__main__":
    sys.exit(main())
