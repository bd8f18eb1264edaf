"""Reports of the S_k table: the worst boxes as text, every box as CSV, a histogram PNG."""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Sequence

import matplotlib
import numpy as np

from training.score_store import COLUMNS

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)


def write_csv(rows: Sequence[dict], path: str | os.PathLike) -> Path:
    """Write rows (lowest S_k first, as given) with the columns of :data:`COLUMNS`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(COLUMNS))
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c) for c in COLUMNS})
    return path


def write_histogram(rows: Sequence[dict], path: str | os.PathLike, title: str = "", bins: int = 20) -> Path:
    """Histogram PNG of the S_k values in ``rows`` over [0, 1] (matplotlib, Agg backend)."""
    s = np.array([r["score"] for r in rows], np.float64)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.hist(s, bins=bins, range=(0.0, 1.0), color="#4477aa", edgecolor="white")
    ax.set_xlabel("mask score S_k (SIM Eq. 11)")
    ax.set_ylabel("boxes")
    stats = f"n={len(s)}" + (f", mean={s.mean():.3f}, median={np.median(s):.3f}" if len(s) else "")
    ax.set_title(f"{title}  ({stats})" if title else stats, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def format_worst(rows: Sequence[dict]) -> str:
    """Text table of rows: S_k, task, region, label, box (pixels)."""
    lines = [f"{'S_k':>6}  {'task':>7}  {'region':<12} {'label':<16} box XYXY px"]
    for r in rows:
        box = ", ".join(f"{r[k]:.0f}" for k in ("x0", "y0", "x1", "y1"))
        lines.append(f"{r['score']:6.3f}  {r['task']:>7}  {str(r['region']):<12} {str(r['label'])[:16]:<16} [{box}]")
    return "\n".join(lines)


__all__ = ["write_csv", "write_histogram", "format_worst"]
