"""Helpers shared by the test packages (fixtures are in ``tests/conftest.py``): the real coco-mini data,
labeling configs and Label Studio result items over it, and a local HTTP file server."""
from __future__ import annotations

import functools
import http.server
import json
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import jwt as pyjwt
import numpy as np
import torch
from pycocotools.coco import COCO

from sim_model.boxes import box_masks, xywh_to_xyxy
from sim_model.datasets import coco_mini_dir, split_files

COCO_MINI = coco_mini_dir()
COCO_VAL_JSON, COCO_VAL_IMAGES = split_files(COCO_MINI, "val2017")
COCO_TRAIN_JSON, COCO_TRAIN_IMAGES = split_files(COCO_MINI, "train2017")
#: LOCAL_FILES_ROOTS of the tests that give task images as local paths (coco-mini).
DATA_ROOTS = (COCO_MINI.resolve(),)


@functools.lru_cache(maxsize=1)
def coco_val():
    """pycocotools COCO index of coco-mini val2017."""
    return COCO(str(COCO_VAL_JSON))


def category_names(c: COCO) -> list[str]:
    """A COCO index's category names in category-id order."""
    return [c.loadCats(i)[0]["name"] for i in sorted(c.getCatIds())]


def coco_category_names() -> list[str]:
    """coco-mini val2017's category names in category-id order."""
    return category_names(coco_val())


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
    """The filled box (COCO [x, y, w, h] pixels) as a (height, width) bool mask: the floor a mask must beat."""
    return box_masks(torch.from_numpy(xywh_to_xyxy(xywh)[None]), height, width)[0].numpy()


def image_info(image_id):
    """(image path, width, height) of a coco-mini val2017 image."""
    im = coco_val().loadImgs(image_id)[0]
    return str(COCO_VAL_IMAGES / im["file_name"]), im["width"], im["height"]


def sample_boxes(n, min_area=1500):
    """n (image_id, label, xywh, gt mask) over different images, medium/large objects, deterministic."""
    out = []
    for img_id in sorted(coco_val().getImgIds()):
        objs = coco_boxes(img_id, min_area=min_area)
        if objs:
            out.append((img_id, *objs[0]))
        if len(out) == n:
            break
    return out


@functools.lru_cache(maxsize=1)
def coco_train():
    """pycocotools COCO index of coco-mini train2017."""
    return COCO(str(COCO_TRAIN_JSON))


def coco_train_labels() -> list[str]:
    """coco-mini train2017's category names in category-id order."""
    return category_names(coco_train())


def poly_item(label: str, seg: list[float], width: int, height: int, rid: str) -> dict:
    """A polygonlabels result item (percent) from a COCO polygon in pixels."""
    pts = np.asarray(seg, dtype=np.float64).reshape(-1, 2)
    return {"id": rid, "type": "polygonlabels", "from_name": "poly", "to_name": "image",
            "original_width": width, "original_height": height, "image_rotation": 0,
            "value": {"points": [[100 * x / width, 100 * y / height] for x, y in pts], "closed": True,
                      "polygonlabels": [label]}}


def make_tasks(n_images: int = 6, polygons_on: int = 2, image_dir: Path = COCO_TRAIN_IMAGES):
    """Label Studio task dicts for the first ``n_images`` coco-mini train2017 images (non-crowd objects).

    Every object gets a rectangle; the objects of the first ``polygons_on`` images with a single-polygon
    segmentation also get the annotator's polygon (a "corrected" mask), with its own region id.
    """
    c = coco_train()
    tasks, truth = [], {}
    for k, img_id in enumerate(sorted(c.getImgIds())[:n_images]):
        info = c.loadImgs(img_id)[0]
        w, h = info["width"], info["height"]
        result = []
        for a in c.loadAnns(c.getAnnIds(imgIds=img_id, iscrowd=False)):
            label = c.loadCats(a["category_id"])[0]["name"]
            result.append(rect_item(label, a["bbox"], w, h, rid=f"b{a['id']}"))
            truth[f"b{a['id']}"] = a
            if k < polygons_on and isinstance(a["segmentation"], list) and len(a["segmentation"]) == 1 \
                    and a["area"] > 500:
                result.append(poly_item(label, a["segmentation"][0], w, h, rid=f"p{a['id']}"))
                truth[f"p{a['id']}"] = a
        tasks.append({"id": 1000 + k, "data": {"image": str(image_dir / info["file_name"])},
                      "updated_at": "2026-11-21T10:00:00Z",
                      "annotations": [{"id": 50 + k, "was_cancelled": False, "result": result,
                                       "updated_at": "2026-11-21T10:00:00Z"}]})
    return tasks, truth


def jwt_token(token_type: str, lifetime_s: float) -> str:
    """A JWT shaped like Label Studio's (``token_type`` "refresh" for a PAT, "access"; ``exp`` from now)."""
    return pyjwt.encode({"token_type": token_type, "exp": int(time.time() + lifetime_s), "jti": uuid.uuid4().hex},
                        "a test secret of at least thirty-two bytes", algorithm="HS256")


class FileServer:
    """A local ``http.server`` on 127.0.0.1 serving a directory like Label Studio serves files.

    Args:
        root: the folder served (``/data/upload/<p>`` and ``/data/local-files/?d=<p>`` map to ``root/<p>``).
        token: a legacy token: requests must carry ``Authorization: Token <token>``.
        pat: a Personal Access Token: ``POST /api/token/refresh/`` {"refresh": pat} answers an access token
            living ``access_lifetime_s`` seconds, and requests must carry ``Bearer <that access token>``.
        reject_next: answer this many authorized file requests with 401 first (a revoked access token).

    Attributes:
        url: ``http://127.0.0.1:<port>``.
        requests: (path, Authorization header) of every GET received.
        refreshes: the number of token exchanges.
    """

    def __init__(self, root: Path, token: str | None = None, pat: str | None = None,
                 access_lifetime_s: float = 300.0, reject_next: int = 0):
        self.root = Path(root)
        self.token, self.pat = token, pat
        self.access_lifetime_s, self.reject_next = access_lifetime_s, reject_next
        self.requests: list[tuple[str, str | None]] = []
        self.refreshes = 0
        self.issued: set[str] = set()
        outer = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a, **kw):
                super().__init__(*a, directory=str(outer.root), **kw)

            def log_message(self, *a):  # keep pytest output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                ok = self.path.rstrip("/") == "/api/token/refresh" and outer.pat is not None \
                    and body.get("refresh") == outer.pat
                if ok:
                    outer.refreshes += 1
                    access = jwt_token("access", outer.access_lifetime_s)
                    outer.issued.add(access)
                data = json.dumps({"access": access} if ok else {"detail": "Token is invalid"}).encode()
                self.send_response(200 if ok else 401)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                auth = self.headers.get("Authorization")
                outer.requests.append((self.path, auth))
                ok = True
                if outer.token is not None:
                    ok = auth == f"Token {outer.token}"
                if outer.pat is not None:
                    ok = auth is not None and auth.startswith("Bearer ") and auth[7:] in outer.issued
                if ok and outer.reject_next > 0:
                    outer.reject_next -= 1
                    ok = False
                if not ok:
                    self.send_error(401, "missing or wrong token")
                    return
                if self.path.startswith("/data/local-files/"):
                    # Label Studio's local files: /data/local-files/?d=<path relative to the root>
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
