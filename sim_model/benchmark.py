"""Box→mask quality and speed benchmark on coco-mini; writes docs/benchmarks.json and docs/benchmarks.md.

Usage (from the repository root)::

    python -m sim_model.benchmark [--engines box,grabcut] [--split val2017] [--max-images N]
                                  [--data-dir DIR] [--options JSON] [--no-write]

Every non-crowd ground-truth box of the split goes through each engine
(:func:`sim_model.evaluation.evaluate_box_to_mask`); the figures are printed as a table and MERGED into
docs/benchmarks.json under ``"coco-mini-<split>" → "<method>"`` (other rows are kept), then
docs/benchmarks.md is re-rendered from the JSON. Other benchmarks (the SIM ladder: ``boxinst``,
``sim_pseudo``, ``sim_full``, …) add their rows through :func:`record_results`.

JSON conventions: ``mIoU*`` in [0, 1]; ``AP*`` in percent (0–100, COCO/paper convention);
``ms_per_box`` / ``ms_per_image`` are median wall-clock milliseconds; every row carries the
``command`` that produced it and the ``machine`` it ran on. A top-level ``_notes`` string is free
text rendered at the end of the markdown.

Data directory: ``--data-dir``, else ``$SIM_DATA_DIR``, else ``../shared/data/coco-mini`` next to the
repository (CI clones beside shared/), else ``/work/shared/data/coco-mini``.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from sim_model.box_to_mask import BoxToMask

REPO_ROOT = Path(__file__).resolve().parent.parent
DOCS_JSON = REPO_ROOT / "docs" / "benchmarks.json"
DOCS_MD = REPO_ROOT / "docs" / "benchmarks.md"

#: Columns of the markdown tables, in order: (json key, header, format).
COLUMNS: list[tuple[str, str, str]] = [
    ("mIoU", "mIoU", "{:.3f}"), ("mIoU_small", "mIoU S", "{:.3f}"), ("mIoU_medium", "mIoU M", "{:.3f}"),
    ("mIoU_large", "mIoU L", "{:.3f}"), ("AP", "AP", "{:.1f}"), ("AP50", "AP50", "{:.1f}"),
    ("AP75", "AP75", "{:.1f}"), ("ms_per_box", "ms/box", "{:.1f}"), ("ms_per_image", "ms/image", "{:.1f}"),
]
#: Row keys that are not rendered as figures.
META_KEYS = {"command", "machine", "config", "model_version", "date"}


def default_data_dir() -> Path:
    """The coco-mini root: ``$SIM_DATA_DIR``, else ``<repo>/../shared/data/coco-mini``, else
    ``/work/shared/data/coco-mini`` (the first that exists; the second when none does)."""
    env = os.environ.get("SIM_DATA_DIR")
    if env:
        return Path(env)
    rel = REPO_ROOT.parent / "shared" / "data" / "coco-mini"
    if rel.is_dir():
        return rel
    fixed = Path("/work/shared/data/coco-mini")
    return fixed if fixed.is_dir() else rel


def machine_description() -> str:
    """One line naming the CPU, the core count and the load average (timings depend on all three)."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = ""
    with contextlib.suppress(OSError, AttributeError):
        load = ", load average %.2f %.2f %.2f" % os.getloadavg()
    return f"{cpu}, {os.cpu_count()} cores{load}, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def _engine_factories() -> dict[str, Callable[[], BoxToMask]]:
    from sim_model.engines.grabcut import GrabCutBoxToMask
    from sim_model.engines.shape_prior import EllipseEngine, FilledBoxEngine
    return {"box": FilledBoxEngine, "ellipse": EllipseEngine, "grabcut": GrabCutBoxToMask}


# -- the shared results file ---------------------------------------------------------------------------
@contextlib.contextmanager
def _locked(path: Path):
    """Exclusive lock (a file in the temp dir named after ``path``) so that concurrent writers of the
    results file do not lose each other's rows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    with open(os.path.join(tempfile.gettempdir(), f"sim_benchmarks_{digest}.lock"), "w") as fh:
        try:
            import fcntl
            fcntl.flock(fh, fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - non-POSIX
            pass
        yield


def _clean(value: Any) -> Any:
    """JSON-safe value: floats rounded to 4 decimals, NaN/inf → None."""
    if isinstance(value, float):
        return None if not math.isfinite(value) else round(value, 4)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item"):  # numpy scalar
        return _clean(value.item())
    return value


def load_results(json_path: Path = DOCS_JSON) -> dict:
    """The current results file as a dict ({} when it does not exist)."""
    json_path = Path(json_path)
    return json.loads(json_path.read_text()) if json_path.exists() else {}


def record_results(dataset: str, method: str, figures: dict, command: str, *, machine: str | None = None,
                   json_path: Path = DOCS_JSON, md_path: Path | None = DOCS_MD) -> dict:
    """Merge one row into docs/benchmarks.json and re-render docs/benchmarks.md.

    Args:
        dataset: table name, e.g. "coco-mini-val2017".
        method: row name, e.g. "grabcut", "boxinst", "sim_full" (an existing row is replaced).
        figures: the row's figures (JSON-serialisable; floats are rounded to 4 decimals). Standard keys:
            ``mIoU``, ``mIoU_small``, ``mIoU_medium``, ``mIoU_large`` in [0, 1]; ``AP``, ``AP50``,
            ``AP75`` in percent (0–100); ``ms_per_box``, ``ms_per_image`` in ms. Any other key (e.g.
            ``train_step_s``) is kept and shown in the table's "other" column.
        command: the shell command that reproduces the row.
        machine: where it ran; default :func:`machine_description` now.
        json_path, md_path: the files (md_path None = do not render).

    Returns:
        The whole merged results dict.
    """
    json_path = Path(json_path)
    with _locked(json_path):
        data = load_results(json_path)
        row = _clean(dict(figures))
        row["command"] = command
        row["machine"] = machine if machine is not None else machine_description()
        row.setdefault("date", time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
        data.setdefault(dataset, {})[method] = row
        tmp = json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
        os.replace(tmp, json_path)
        if md_path is not None:
            Path(md_path).write_text(render_markdown(data))
    return data


def _fmt(value: Any, fmt: str) -> str:
    if value is None:
        return "–"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def render_markdown(data: dict) -> str:
    """docs/benchmarks.md from the results dict: one table per dataset, the command and machine of each
    row, then the ``_notes`` text."""
    lines = ["# Benchmarks", "",
             "Generated by `python -m sim_model.benchmark` from `docs/benchmarks.json` — edit the JSON's "
             "`_notes` (or re-run the benchmark), not this file.", "",
             "Conventions: **mIoU** in [0, 1] (mean over ground-truth boxes of IoU(predicted mask ≥ 0.5, "
             "ground-truth mask); S/M/L = COCO size of the ground truth: area < 32², < 96², ≥ 96² px). "
             "**AP, AP50, AP75** = COCO segm AP from pycocotools COCOeval in **percent (0–100)**, masks "
             "submitted as detections with the engine's score. **ms/box** = median over boxes of the image's "
             "predict time divided by its box count; **ms/image** = median predict time per image "
             "(wall clock, one process).", ""]
    for dataset, rows in data.items():
        if dataset.startswith("_") or not isinstance(rows, dict):
            continue
        lines += [f"## {dataset}", ""]
        header = ["method"] + [h for _, h, _ in COLUMNS] + ["other"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for method, row in rows.items():
            std = {k for k, _, _ in COLUMNS}
            other = ", ".join(f"{k}={_fmt(v, '{:.4g}')}" for k, v in row.items()
                              if k not in std and k not in META_KEYS and not isinstance(v, (dict, list)))
            cells = [f"`{method}`"] + [_fmt(row.get(k), f) for k, _, f in COLUMNS] + [other]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "Commands and machines:", ""]
        for method, row in rows.items():
            extra = f" (`{row['model_version']}`)" if row.get("model_version") else ""
            lines.append(f"- `{method}`{extra}: `{row.get('command', '?')}` — {row.get('machine', '?')}, "
                         f"{row.get('date', '')}")
            if isinstance(row.get("config"), dict):
                lines.append("  config: `" + json.dumps(row["config"], sort_keys=True) + "`")
        lines.append("")
    notes = data.get("_notes")
    if notes:
        lines += ["## Notes", "", notes if isinstance(notes, str) else json.dumps(notes, indent=2), ""]
    return "\n".join(lines)


# -- command line -----------------------------------------------------------------------------------------
FIGURE_KEYS = ["mIoU", "mIoU_small", "mIoU_medium", "mIoU_large", "AP", "AP50", "AP75", "AP_small",
               "AP_medium", "AP_large", "ms_per_box", "ms_per_image", "n_images", "n_boxes", "model_version"]


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    from sim_model.evaluation import evaluate_box_to_mask

    factories = _engine_factories()
    p = argparse.ArgumentParser(prog="python -m sim_model.benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("--engines", default="box,grabcut", help=f"comma list of {sorted(factories)}")
    p.add_argument("--split", default="val2017", help="coco-mini split (val2017 or train2017)")
    p.add_argument("--max-images", type=int, default=None, help="first N images only (by image id)")
    p.add_argument("--data-dir", default=None, help="coco-mini root (default: $SIM_DATA_DIR, ../shared/data/coco-mini)")
    p.add_argument("--options", default=None,
                   help='JSON keyword arguments for the engines\' constructors, e.g. \'{"short_side": 160}\'; '
                        'rows are then named "<engine>+key=value,..." so the shipped rows stay')
    p.add_argument("--no-write", action="store_true", help="print only; do not touch docs/benchmarks.*")
    p.add_argument("--quiet", action="store_true", help="no per-image progress")
    args = p.parse_args(argv)

    names = [n.strip() for n in args.engines.split(",") if n.strip()]
    unknown = [n for n in names if n not in factories]
    if unknown:
        p.error(f"unknown engine(s) {unknown}; choose from {sorted(factories)}")
    root = Path(args.data_dir) if args.data_dir else default_data_dir()
    ann = root / args.split / "annotations" / f"instances_{args.split}.json"
    img_dir = root / args.split / "images"
    if not ann.exists():
        print(f"error: {ann} not found (set --data-dir or SIM_DATA_DIR)", file=sys.stderr)
        return 2
    dataset = f"coco-mini-{args.split}"
    if args.max_images is not None:
        dataset += f"-first{args.max_images}"
    command = "python -m sim_model.benchmark " + " ".join(
        a for a in (argv if argv is not None else sys.argv[1:]))

    options = json.loads(args.options) if args.options else {}
    suffix = ("+" + ",".join(f"{k}={v}" for k, v in options.items())) if options else ""
    results = {}
    for name in names:
        engine = factories[name](**options)
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
        print(f"{name:<{width}}" + "".join(f"{_fmt(fig.get(k), f):>10}" for k, _, f in COLUMNS))
    if not args.no_write:
        print(f"\nwrote {DOCS_JSON.relative_to(REPO_ROOT)} and {DOCS_MD.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
