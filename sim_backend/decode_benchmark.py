"""Peak memory of decoding one image for a /predict, in a fresh process per measurement.

The worst images a task can hold under the default MAX_IMAGE_PIXELS (50 M): a 7071 x 7071 (49.998 M px)
16-bit grayscale PNG (a gradient, 1.4 MB; a flat one is 97 kB: decoding is where the memory goes), the
same as 8-bit RGB, and two 16-bit ones decoded at once by two threads of a worker. Each row: the process's peak resident memory
above what it held before the decode (``ru_maxrss`` after, minus the resident size before), in MB, and
per decoded megapixel.

    .venv/bin/python -m sim_backend.decode_benchmark [--label after] [--no-write]

prints the figures and merges them into docs/benchmarks.json / .md (table ``backend-decode-memory``,
rows ``<kind>-<label>``).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

TABLE = "backend-decode-memory"
SIDE = 7071

#: The child: decode the files given (each in its own thread when several) and report the peak.
_CHILD = r"""
import json, resource, sys, threading
from pathlib import Path
from sim_backend.images import decode_image
datas = [Path(p).read_bytes() for p in sys.argv[1:]]
page = resource.getpagesize()
before_kb = int(open("/proc/self/statm").read().split()[1]) * page / 1024
shapes = []
def run(d):
    shapes.append(decode_image(d, 50_000_000, "bench").shape)
threads = [threading.Thread(target=run, args=(d,)) for d in datas]
for t in threads: t.start()
for t in threads: t.join()
peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_mb": (peak_kb - before_kb) / 1024, "shapes": shapes}))
"""


def make_images(folder: Path, side: int = SIDE) -> dict[str, Path]:
    """The test images: ``gray16`` (mode I;16 PNG, a smooth gradient) and ``rgb8`` (RGB PNG), side x side."""
    ramp = np.linspace(0, 65535, side, dtype=np.float64)
    gray16 = (ramp[None, :] * 0.5 + ramp[:, None] * 0.5).astype(np.uint16)
    paths = {"gray16": folder / "gray16.png", "rgb8": folder / "rgb8.png"}
    Image.fromarray(gray16).save(paths["gray16"])
    rgb = np.repeat((gray16 >> 8).astype(np.uint8)[:, :, None], 3, axis=2)
    del gray16
    Image.fromarray(rgb).save(paths["rgb8"])
    return paths


def measure(files: list[Path]) -> dict:
    """Peak MB above the baseline of a fresh process that decodes ``files`` (one thread each)."""
    out = subprocess.run([sys.executable, "-c", _CHILD, *map(str, files)], check=True, capture_output=True,
                         text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--label", default="after", help="row suffix, e.g. before/after a change")
    ap.add_argument("--no-write", action="store_true", help="print only; do not touch docs/benchmarks.*")
    args = ap.parse_args(argv)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_images(Path(tmp))
        cases = {"gray16": [paths["gray16"]], "rgb8": [paths["rgb8"]],
                 "gray16-two-at-once": [paths["gray16"], paths["gray16"]]}
        for name, files in cases.items():
            got = measure(files)
            mpx = SIDE * SIDE * len(files) / 1e6
            rows[name] = {"peak_mb": got["peak_mb"], "mb_per_mpx": got["peak_mb"] / mpx,
                          "file_kb": files[0].stat().st_size / 1024, "pixels": SIDE * SIDE}
            print(f"{name:20s} peak {got['peak_mb']:7.0f} MB  ({got['peak_mb'] / mpx:.1f} MB per decoded MPx, "
                  f"file {rows[name]['file_kb']:.0f} kB)")
    if not args.no_write:
        from sim_model.results import record_results
        for name, figures in rows.items():
            record_results(TABLE, f"{name}-{args.label}", figures,
                           f"python -m sim_backend.decode_benchmark --label {args.label}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
