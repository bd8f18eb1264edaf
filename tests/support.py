"""Shared helpers of the backend tests (tests/test_backend_*.py): coco-mini access, configs, a tiny HTTP server."""
from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path

import numpy as np

from sim_model.benchmark import default_data_dir

COCO_VAL = default_data_dir() / "val2017"
COCO_VAL_IMAGES = COCO_VAL / "images"
COCO_VAL_JSON = COCO_VAL / "annotations" / "instances_val2017.json"


@functools.lru_cache(maxsize=1)
def coco_val():
    """pycocotools COCO index of coco-mini val2017."""
    from pycocotools.coco import COCO

    return COCO(str(COCO_VAL_JSON))


def coco_category_names() -> list[str]:
    c = coco_val()
    return [c.loadCats(i)[0]["name"] for i in sorted(c.getCatIds())]


def labels_xml(tag: str, name: str, labels) -> str:
    inner = "".join(f'<Label value="{l}"/>' for l in labels)
    return f'<{tag} name="{name}" toName="image">{inner}</{tag}>'


def coco_config(brush: bool = True, polygon: bool = True, labels=None) -> str:
    """A labeling config: Image + RectangleLabels + PolygonLabels (+ BrushLabels) over coco-mini's categories."""
    labels = labels or coco_category_names()
    parts = ['<View>', '<Image name="image" value="$image"/>', labels_xml("RectangleLabels", "box", labels)]
    if polygon:
        parts.append(labels_xml("PolygonLabels", "poly", labels))
    if brush:
        parts.append(labels_xml("BrushLabels", "brush", labels))
    parts.append("</View>")
    return "".join(parts)


def coco_boxes(image_id: int, min_area: float = 0.0):
    """Non-crowd annotations of one image: list of (label, xywh box px, gt bool mask HxW)."""
    c = coco_val()
    out = []
    for a in c.loadAnns(c.getAnnIds(imgIds=image_id, iscrowd=False)):
        if a["area"] < min_area:
            continue
        out.append((c.loadCats(a["category_id"])[0]["name"], list(map(float, a["bbox"])), c.annToMask(a).astype(bool)))
    return out


def rect_item(label: str, xywh, width: int, height: int, rid: str = "r1", from_name: str = "box") -> dict:
    """A Label Studio rectanglelabels result item (percent) for a pixel box."""
    x, y, w, h = xywh
    return {"id": rid, "type": "rectanglelabels", "from_name": from_name, "to_name": "image",
            "original_width": width, "original_height": height, "image_rotation": 0,
            "value": {"x": 100 * x / width, "y": 100 * y / height, "width": 100 * w / width,
                      "height": 100 * h / height, "rotation": 0, "rectanglelabels": [label]}}


def iou(a: np.ndarray, b: np.ndarray) -> float:
    inter = np.logical_and(a, b).sum()
    union = np.logical_or(a, b).sum()
    return float(inter / union) if union else 1.0


def box_mask(xywh, width: int, height: int) -> np.ndarray:
    """The filled box as a bool mask (the floor a mask must beat)."""
    x, y, w, h = xywh
    m = np.zeros((height, width), bool)
    m[int(round(y)):int(round(y + h)), int(round(x)):int(round(x + w))] = True
    return m


class FileServer:
    """A local ``http.server`` on 127.0.0.1 serving a directory; optionally requires a token header.

    Attributes:
        url: ``http://127.0.0.1:<port>``.
        requests: (path, Authorization header) of every request received.
    """

    def __init__(self, root: Path, token: str | None = None):
        self.root = Path(root)
        self.token = token
        self.requests: list[tuple[str, str | None]] = []
        outer = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a, **kw):
                super().__init__(*a, directory=str(outer.root), **kw)

            def log_message(self, *a):  # keep pytest output clean
                pass

            def do_GET(self):
                auth = self.headers.get("Authorization")
                outer.requests.append((self.path, auth))
                if outer.token is not None and auth != f"Token {outer.token}":
                    self.send_error(401, "missing or wrong token")
                    return
                if self.path.startswith("/data/local-files/"):
                    # Label Studio's local files: /data/local-files/?d=<path relative to the root>
                    from urllib.parse import parse_qs, urlparse
                    d = parse_qs(urlparse(self.path).query).get("d", [""])[0]
                    self.path = "/" + d
                elif self.path.startswith("/data/upload/"):
                    self.path = self.path[len("/data/upload"):]
                super().do_GET()

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._httpd.shutdown()
        self._httpd.server_close()
