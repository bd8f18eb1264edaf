"""``python -m training.registry --project ID [--model-dir DIR] [--set-current VERSION]``.

Lists the project's model versions (``*`` = served) with their validation figures and publish
decisions (:class:`sim_model.registry.ModelRegistry`); ``--set-current`` switches ``CURRENT`` by hand
(a rollback), bypassing the quality gate. Exit codes: 0 done, 2 usage error, 3 unknown or incomplete
version.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from sim_backend.settings import Settings
from sim_backend.tasks import parse_project_id
from sim_model.registry import ModelRegistry, VersionInfo


def format_versions(project: str, infos: list[VersionInfo]) -> str:
    """Table of versions: name, served mark, validation mIoU/AP, baseline mIoU, publish decision."""
    def fig(d: dict, key: str, fmt: str) -> str:
        return (fmt % d[key]) if isinstance(d.get(key), (int, float)) else "-"

    lines = [f"project {project}: {len(infos)} version(s)",
             f"{'':2}{'version':<8} {'val mIoU':>8} {'val AP':>7} {'served before':>13}  created / decision"]
    for i in infos:
        val, base, pub = i.metrics.get("val") or {}, i.metrics.get("baseline") or {}, i.metrics.get("publish") or {}
        lines.append(f"{'*' if i.current else ' ':2}{i.name:<8} {fig(val, 'mIoU', '%.4f'):>8} "
                     f"{fig(val, 'AP', '%.1f'):>7} {fig(base, 'mIoU', '%.4f'):>13}  "
                     f"{i.metrics.get('created_at', '?')} {pub.get('reason', '')}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (module docstring)."""
    p = argparse.ArgumentParser(prog="python -m training.registry", description=__doc__.split("\n\n")[1])
    p.add_argument("--project", required=True, type=parse_project_id, help="Label Studio project id")
    p.add_argument("--model-dir", default=None, help="model registry root (default: env MODEL_DIR or ./models)")
    p.add_argument("--set-current", metavar="VERSION", default=None,
                   help="serve this version now (rollback), without the quality gate")
    args = p.parse_args(argv)
    reg = ModelRegistry(args.model_dir or Settings.from_env().model_dir)
    if args.set_current:
        try:
            reg.set_current(args.project, args.set_current)
        except FileNotFoundError as e:
            print(f"error: {e}", file=sys.stderr)
            return 3
        print(f"project {args.project}: now serving {args.set_current}")
    print(format_versions(args.project, reg.list_versions(args.project)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
