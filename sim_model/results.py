"""The shared benchmark results file, ``docs/benchmarks.json``, and its rendering ``docs/benchmarks.md``.

Every benchmark (the engines on a dataset, the SIM ladder, the learning curves, the load test) merges
its rows into the JSON with :func:`record_results`, which re-renders the markdown from it.

JSON conventions: ``mIoU*`` in [0, 1]; ``AP*`` in percent (0–100, COCO/paper convention);
``ms_per_box`` / ``ms_per_image`` are median wall-clock milliseconds; every row carries the
``command`` that produced it and the ``machine`` it ran on. A top-level ``_notes`` string is free
text rendered at the end of the markdown.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

from sim_model.datasets import REPO_ROOT
from sim_model.files import atomic_write_text

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


@contextlib.contextmanager
def _locked(path: Path):
    """Exclusive lock (a file in the temp dir named after ``path``) so that concurrent writers of the
    results file do not lose each other's rows."""
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    with open(os.path.join(tempfile.gettempdir(), f"sim_benchmarks_{digest}.lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
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
    json_path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(json_path):
        data = load_results(json_path)
        row = _clean(dict(figures))
        row["command"] = command
        row["machine"] = machine if machine is not None else machine_description()
        row.setdefault("date", time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
        data.setdefault(dataset, {})[method] = row
        atomic_write_text(json_path, json.dumps(data, indent=2, sort_keys=False) + "\n")
        if md_path is not None:
            atomic_write_text(md_path, render_markdown(data))
    return data


def fmt(value: Any, spec: str) -> str:
    """``spec.format(value)``, "–" for None, ``str(value)`` when the format does not apply."""
    if value is None:
        return "–"
    try:
        return spec.format(value)
    except (ValueError, TypeError):
        return str(value)


def render_markdown(data: dict) -> str:
    """docs/benchmarks.md from the results dict: one table per dataset, the command and machine of each
    row, then the ``_notes`` text."""
    lines = ["# Benchmarks", "",
             "Generated from `docs/benchmarks.json` by the benchmarks (`sim_model.results.record_results`) — "
             "edit the JSON's `_notes` (or re-run a benchmark), not this file.", "",
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
            other = ", ".join(f"{k}={fmt(v, '{:.4g}')}" for k, v in row.items()
                              if k not in std and k not in META_KEYS and not isinstance(v, (dict, list)))
            cells = [f"`{method}`"] + [fmt(row.get(k), f) for k, _, f in COLUMNS] + [other]
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
