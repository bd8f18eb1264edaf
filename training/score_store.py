"""The per-project table of mask-quality scores S_k: ``<model dir>/<project>/scores.sqlite``.

One row per (task, region, version)::

    scores(task INTEGER, region TEXT, version TEXT, label TEXT, score REAL,
           x0 REAL, y0 REAL, x1 REAL, y1 REAL, image TEXT, created_at TEXT,
           PRIMARY KEY (task, region, version))

``region`` is the Label Studio result id of the box; the box is in pixels (XYXY); ``score`` is S_k
(SIM Eq. 11) of the box's mask with that version.
"""
from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path
from typing import Iterable

SCORES_DB = "scores.sqlite"
COLUMNS = ("task", "region", "version", "label", "score", "x0", "y0", "x1", "y1", "image", "created_at")


class ScoreDB:
    """The per-project S_k table (module docstring).

    Args:
        path: the SQLite file (created with its table on first use).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as con:
            con.execute("""CREATE TABLE IF NOT EXISTS scores (
                task INTEGER NOT NULL, region TEXT NOT NULL, version TEXT NOT NULL, label TEXT,
                score REAL NOT NULL, x0 REAL, y0 REAL, x1 REAL, y1 REAL, image TEXT, created_at TEXT,
                PRIMARY KEY (task, region, version))""")
            con.execute("CREATE INDEX IF NOT EXISTS scores_version_score ON scores (version, score)")

    @classmethod
    def for_project(cls, model_dir: str | os.PathLike, project: int | str) -> "ScoreDB":
        """The table of ``<model dir>/<project>/scores.sqlite``."""
        return cls(Path(model_dir) / str(project) / SCORES_DB)

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=30)
        con.row_factory = sqlite3.Row
        return con

    def put(self, rows: Iterable[dict]) -> int:
        """Insert or replace rows (dicts with the keys of :data:`COLUMNS`; ``created_at`` optional).

        Returns:
            number of rows written.
        """
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        data = [tuple(r.get(c, now if c == "created_at" else None) for c in COLUMNS) for r in rows]
        with self._connect() as con:
            con.executemany(f"INSERT OR REPLACE INTO scores ({', '.join(COLUMNS)}) "
                            f"VALUES ({', '.join('?' * len(COLUMNS))})", data)
        return len(data)

    def versions(self) -> list[str]:
        """Versions that have scores, sorted by name."""
        with self._connect() as con:
            return [r[0] for r in con.execute("SELECT DISTINCT version FROM scores ORDER BY version")]

    def rows(self, version: str, worst: int | None = None) -> list[dict]:
        """Rows of one version, lowest S_k first (ties by task, region); at most ``worst`` rows."""
        q = "SELECT * FROM scores WHERE version = ? ORDER BY score ASC, task ASC, region ASC"
        args: tuple = (version,)
        if worst is not None:
            q += " LIMIT ?"
            args += (int(worst),)
        with self._connect() as con:
            return [dict(r) for r in con.execute(q, args)]

    def count(self, version: str | None = None) -> int:
        """Number of rows (of one version, or all)."""
        with self._connect() as con:
            if version is None:
                return con.execute("SELECT COUNT(*) FROM scores").fetchone()[0]
            return con.execute("SELECT COUNT(*) FROM scores WHERE version = ?", (version,)).fetchone()[0]





def score_row(task, region, version: str, score: float) -> dict:
    """The table row of one box: a :class:`training.ls_export.ExportedTask`'s :class:`sim_backend.tasks.Region`
    scored ``score`` (S_k) by ``version``."""
    x0, y0, x1, y1 = (float(v) for v in region.box)
    return {"task": task.task_id, "region": region.region_id, "version": version, "label": region.label,
            "score": float(score), "x0": x0, "y0": y0, "x1": x1, "y1": y1, "image": task.image_url}
__all__ = ["SCORES_DB", "COLUMNS", "ScoreDB", "score_row"]
