"""Every row of what a stock Label Studio and an open network did to the backend, one test each.

The settings come from environment-variable mappings (``Settings.from_env``), the requests go through the
real Flask app (or the real image loader), and the servers are real HTTP servers on 127.0.0.1.
"""
from __future__ import annotations

import base64
import http.server
import io
import json
import logging
import os
import re
import select
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sim_backend.app import create_app
from sim_backend.engines import EngineProvider
from sim_backend.images import QUOTE_CHARS, ImageLoader, ImageLoadError
from sim_backend.settings import Settings
from sim_backend.webhook import on_webhook
from sim_model.engines.shape_prior import FilledBoxEngine
from sim_model.registry import ProjectLock, retrain_slots
from sim_model.datasets import REPO_ROOT
from tests.support import COCO_VAL_IMAGES, FileServer, coco_boxes, coco_config, jwt_token, rect_item

IMG = COCO_VAL_IMAGES / "000000000139.jpg"  # 640 x 426
LABEL, XYWH, _ = coco_boxes(139, min_area=2000)[0]
MIB = 1 << 20


def _settings(tmp_path: Path, **env: str) -> Settings:
    base = {"MODEL_DIR": str(tmp_path / "models"), "LOCAL_FILES_ROOTS": str(tmp_path), "LOG_LEVEL": "WARNING"}
    return Settings.from_env({**base, **env})


def _client(settings: Settings, engine=None):
    provider = EngineProvider(settings, fallback_factory=(lambda: engine)) if engine is not None else None
    return create_app(settings, provider).test_client()


def _predict(client, image, rects=None, w=640, h=426, **extra):
    payload = {"label_config": coco_config(), "project": 3, "tasks": [{"id": 1, "data": {"image": image}}],
               "params": {"context": {"result": rects if rects is not None else [rect_item(LABEL, XYWH, w, h)]}}}
    payload.update(extra)
    return client.post("/predict", json=payload)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Streamer:
    """An HTTP server on 127.0.0.1 whose GET answers ``body(handler)``; records what it was asked."""

    def __init__(self, body):
        self.requests = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_GET(self):
                outer.requests.append((self.path, self.headers.get("Authorization")))
                try:
                    body(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    def close(self):
        self._httpd.shutdown()
        self._httpd.server_close()


@pytest.fixture()
def image_copy(tmp_path):
    shutil.copy(IMG, tmp_path / "a.jpg")
    return tmp_path / "a.jpg"


# ---------------------------------------------------------------------------------------------- Label Studio auth
def test_personal_access_token_fetches_label_studio_files(tmp_path, image_copy):
    """A stock Label Studio 1.23: legacy tokens off, the user's key is a PAT."""
    pat = jwt_token("refresh", 3600)
    with FileServer(tmp_path, pat=pat) as ls:
        client = _client(_settings(tmp_path, LABEL_STUDIO_URL=ls.url, LABEL_STUDIO_API_KEY=pat))
        body = _predict(client, "/data/upload/a.jpg").get_json()
    assert body["errors"] == [] and body["results"][0]["result"]
    assert ls.refreshes == 1 and ls.requests[0][1].startswith("Bearer ") and pat not in ls.requests[0][1]


# ---------------------------------------------------------------------------------------------- authentication
def test_without_basic_auth_every_endpoint_but_health_answers_401(tmp_path, image_copy):
    client = _client(_settings(tmp_path, BASIC_AUTH_USER="labelstudio", BASIC_AUTH_PASS="s3cret"))
    calls = [("post", "/predict", {"tasks": [{"id": 1, "data": {"image": str(image_copy)}}]}),
             ("post", "/setup", {"project": 1, "schema": coco_config()}),
             ("post", "/webhook", {"action": "START_TRAINING", "project": {"id": 5}}), ("get", "/versions", None)]
    for method, path, body in calls:
        for auth in (None, ("labelstudio", "wrong"), ("other", "s3cret")):
            r = getattr(client, method)(path, json=body, auth=auth)
            assert r.status_code == 401 and "authentication required" in r.get_json()["error"], (path, auth)
            assert r.headers["WWW-Authenticate"].startswith("Basic")
    assert client.get("/health").status_code == 200
    assert not (tmp_path / "models" / "5").exists()  # the anonymous webhook started nothing
    ok = ("labelstudio", "s3cret")
    assert client.post("/setup", json={"project": 1, "schema": coco_config()}, auth=ok).status_code == 200
    assert _predict(client, str(image_copy), auth=None).status_code == 401
    r = client.post("/predict", auth=ok, json={"label_config": coco_config(), "tasks": [
        {"id": 1, "data": {"image": str(image_copy)}}], "params": {"context": {"result": [rect_item(LABEL, XYWH, 640, 426)]}}})
    assert r.status_code == 200 and r.get_json()["results"][0]["result"]


def test_a_webhook_flood_starts_at_most_max_concurrent_retrains(tmp_path):
    settings = _settings(tmp_path, LABEL_STUDIO_URL=f"http://127.0.0.1:{_free_port()}", LABEL_STUDIO_API_KEY="k",
                         MAX_CONCURRENT_RETRAINS="1", RETRAIN_ARGS="--timeout 2")
    t0 = time.monotonic()
    answers = [on_webhook({"action": "START_TRAINING", "project": {"id": 100 + i}}, settings) for i in range(20)]
    assert time.monotonic() - t0 < 10
    started = [a for a in answers if a["status"] == "started"]
    assert len(started) == 1 and all(a["status"] == "busy" and "MAX_CONCURRENT_RETRAINS=1" in a["message"]
                                     for a in answers if a["status"] != "started")
    slot = retrain_slots(settings.model_dir, 1)[0]
    assert slot.is_held()  # the started retrain holds the slot
    deadline = time.monotonic() + 180
    while slot.is_held() or ProjectLock(settings.model_dir, started[0]["project"]).is_held():
        assert time.monotonic() < deadline, "the retrain never ended"
        time.sleep(0.3)
    assert on_webhook({"action": "START_TRAINING", "project": {"id": 999}}, settings)["status"] == "started"


def test_setup_cannot_redirect_the_token_or_the_fetches(tmp_path, image_copy, caplog):
    """No LABEL_STUDIO_URL/_API_KEY in the environment, no basic auth: /setup's hostname is not trusted."""
    foreign = Streamer(lambda h: h.send_error(404))
    try:
        client = _client(_settings(tmp_path))
        with caplog.at_level(logging.WARNING, logger="sim_backend"):
            assert client.post("/setup", json={"project": 1, "schema": coco_config(), "hostname": foreign.url,
                                               "access_token": "stolen"}).status_code == 200
        body = _predict(client, "/data/upload/a.jpg").get_json()
    finally:
        foreign.close()
    assert foreign.requests == [] and "not set" in body["errors"][0]["error"]
    assert "ignored" in caplog.text


# ---------------------------------------------------------------------------------------------- memory and time
def test_an_image_url_serving_300_mb_is_refused_by_its_length_and_by_a_capped_read(tmp_path):
    def declared(h):  # announces 300 MB, sends a little
        h.send_response(200)
        h.send_header("Content-Length", str(300 * MIB))
        h.end_headers()
        h.wfile.write(b"x" * 1000)

    def undeclared(h):  # streams without a length until the client goes away
        h.send_response(200)
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        chunk = b"y" * MIB
        for _ in range(300):
            h.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))

    settings = _settings(tmp_path, MAX_IMAGE_BYTES=str(4 * MIB), IMAGE_HOSTS_ALLOWED="127.0.0.1")
    for body, match in ((declared, "Content-Length 314572800 above MAX_IMAGE_BYTES"),
                        (undeclared, "more than MAX_IMAGE_BYTES")):
        srv = Streamer(body)
        try:
            tracemalloc.start()
            with pytest.raises(ImageLoadError, match=match):
                ImageLoader(settings).load(srv.url + "/big.jpg")
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        finally:
            srv.close()
        assert peak < 16 * MIB, peak


def test_a_1_gb_local_file_and_dev_zero_are_refused_unread(tmp_path):
    big = tmp_path / "big.jpg"
    with open(big, "wb") as f:
        f.truncate(1 << 30)  # sparse: 1 GB long, nothing on disk
    loader = ImageLoader(_settings(tmp_path))
    t0 = time.monotonic()
    with pytest.raises(ImageLoadError, match="1073741824 bytes, above MAX_IMAGE_BYTES"):
        loader.load(str(big))
    with pytest.raises(ImageLoadError, match="outside LOCAL_FILES_ROOTS"):
        loader.load("/dev/zero")
    with pytest.raises(ImageLoadError, match="not a regular file"):
        ImageLoader(Settings(local_files_roots=(Path("/dev"),))).load("/dev/zero")
    assert time.monotonic() - t0 < 5


def test_a_200_mb_json_body_is_refused_with_413(tmp_path):
    client = _client(_settings(tmp_path, MAX_REQUEST_BYTES=str(2 * MIB)))
    r = client.post("/predict", data=b'{"tasks": "' + b"x" * (3 * MIB) + b'"}', content_type="application/json")
    assert r.status_code == 413 and "MAX_REQUEST_BYTES=2097152" in r.get_json()["error"]
    assert client.get("/health").status_code == 200


def test_1000_boxes_cost_their_area_not_1000_images(tmp_path):
    """1 000 boxes on a 640x480 image (+1.17 GB with one full-image float mask per box before)."""
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(tmp_path / "n.png")
    xy = np.random.default_rng(1).uniform(0, 600, (1000, 2)) * [1, 0.7]
    rects = [rect_item("tv", [x, y, 30, 30], 640, 480, rid=f"r{i}") for i, (x, y) in enumerate(xy)]
    client = _client(_settings(tmp_path), engine=FilledBoxEngine())
    tracemalloc.start()
    r = _predict(client, str(tmp_path / "n.png"), rects, w=640, h=480)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    body = r.get_json()
    assert body["errors"] == [] and sum(x["type"] == "polygonlabels" for x in body["results"][0]["result"]) == 1000
    assert peak < 150 * MIB, peak / MIB  # masks: 1000 × 31 × 31 floats; one image-sized brush mask at a time


def test_8_boxes_on_a_49_megapixel_image(tmp_path):
    """+2.07 GB before (8 full-image float masks and their copies): now the image, one image-sized brush mask at a
    time (Label Studio's brush RLE covers the whole image), and the boxes' crops; 8 boxes cost what 1 box does."""
    big = np.full((7000, 7000, 3), 90, np.uint8)
    big[2000:5000, 2000:5000] = 200
    Image.fromarray(big).save(tmp_path / "big.png")
    del big
    rects = [rect_item("tv", [1500 + 300 * i, 1500 + 200 * i, 2500, 2600], 7000, 7000, rid=f"r{i}") for i in range(8)]
    peaks = {}
    for n in (1, 8):
        client = _client(_settings(tmp_path))
        tracemalloc.start()
        r = _predict(client, str(tmp_path / "big.png"), rects[:n], w=7000, h=7000)
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        body = r.get_json()
        assert body["errors"] == [] and {x["type"] for x in body["results"][0]["result"]} == {"polygonlabels",
                                                                                               "brushlabels"}
        del client
    image = 7000 * 7000 * 3
    assert peaks[8] < 6 * image, peaks[8] / MIB
    assert peaks[8] - peaks[1] < 7 * 2600 * 2700 * 4 + 50 * MIB, (peaks[1] / MIB, peaks[8] / MIB)


def test_one_image_under_six_spellings_is_cached_once(tmp_path, image_copy):
    (tmp_path / "sub").mkdir()
    os.symlink(image_copy, tmp_path / "link.jpg")
    spellings = [str(image_copy), f"{tmp_path}/./a.jpg", f"{tmp_path}//a.jpg", f"{tmp_path}/sub/../a.jpg",
                 image_copy.as_uri(), str(tmp_path / "link.jpg")]
    loader = ImageLoader(_settings(tmp_path))
    first = loader.load(spellings[0])
    assert all(loader.load(s) is first for s in spellings[1:])
    assert loader.cache_bytes == first.nbytes


@pytest.mark.timeout(20)
def test_a_fifo_path_is_refused_at_once(tmp_path):
    os.mkfifo(tmp_path / "pipe.jpg")
    t0 = time.monotonic()
    with pytest.raises(ImageLoadError, match="not a regular file"):
        ImageLoader(_settings(tmp_path)).load(str(tmp_path / "pipe.jpg"))
    assert time.monotonic() - t0 < 2


def _drip(h):
    h.send_response(200)
    h.send_header("Content-Length", "100000")
    h.end_headers()
    for _ in range(100000):
        h.wfile.write(b"x")
        h.wfile.flush()
        time.sleep(0.5)


@pytest.mark.timeout(60)
def test_a_dripping_server_is_cut_at_the_fetch_deadline(tmp_path):
    """A byte every 0.5 s never trips the 10-s read timeout; the whole fetch still ends at its deadline."""
    srv = Streamer(_drip)
    try:
        loader = ImageLoader(_settings(tmp_path, IMAGE_HOSTS_ALLOWED="127.0.0.1", IMAGE_FETCH_TIMEOUT_S="10",
                                       IMAGE_FETCH_DEADLINE_S="2"))
        t0 = time.monotonic()
        with pytest.raises(ImageLoadError, match="IMAGE_FETCH_DEADLINE_S=2.0 exceeded"):
            loader.load(srv.url + "/slow.jpg")
        assert time.monotonic() - t0 < 4
    finally:
        srv.close()


@pytest.mark.timeout(60)
def test_a_request_answers_by_its_deadline_with_the_rest_marked(tmp_path, image_copy):
    srv = Streamer(_drip)
    try:
        client = _client(_settings(tmp_path, IMAGE_HOSTS_ALLOWED="127.0.0.1", REQUEST_DEADLINE_S="3",
                                   IMAGE_FETCH_DEADLINE_S="30"))
        tasks = [{"id": 1, "data": {"image": str(image_copy)}, "annotations": [{"id": 1, "result": [
            rect_item(LABEL, XYWH, 640, 426)]}]}]
        tasks += [{"id": 2 + i, "data": {"image": f"{srv.url}/slow{i}.jpg"}, "annotations": [{"id": 1, "result": [
            rect_item(LABEL, XYWH, 640, 426)]}]} for i in range(3)]
        t0 = time.monotonic()
        r = client.post("/predict", json={"label_config": coco_config(), "project": 3, "tasks": tasks})
        took = time.monotonic() - t0
    finally:
        srv.close()
    body = r.get_json()
    assert r.status_code == 200 and len(body["results"]) == 4 and took < 6
    assert body["results"][0]["result"]  # the first task was answered
    errors = [x.get("error", "") for x in body["results"][1:]]
    assert "IMAGE_FETCH_DEADLINE_S" in errors[0] or "deadline" in errors[0]
    assert all("deadline exceeded" in e for e in errors[1:])


# ---------------------------------------------------------------------------------------------- where images come from
def test_private_addresses_are_refused_unless_allowed_also_after_a_redirect(tmp_path, image_copy):
    with FileServer(tmp_path) as files:
        hop = Streamer(lambda h: (h.send_response(302), h.send_header("Location", files.url + "/a.jpg"),
                                  h.send_header("Content-Length", "0"), h.end_headers()))
        try:
            with pytest.raises(ImageLoadError, match="private, loopback, link-local or tunnelled.*IMAGE_HOSTS_ALLOWED"):
                ImageLoader(_settings(tmp_path)).load(files.url + "/a.jpg")
            # "localhost" is allowed, 127.0.0.1 (where it redirects to) is not
            to_localhost = hop.url.replace("127.0.0.1", "localhost")
            with pytest.raises(ImageLoadError, match="private, loopback"):
                ImageLoader(_settings(tmp_path, IMAGE_HOSTS_ALLOWED="localhost")).load(to_localhost + "/r.jpg")
            assert files.requests == []  # the redirect target was never asked
            ok = ImageLoader(_settings(tmp_path, IMAGE_HOSTS_ALLOWED="localhost,127.0.0.1")).load(to_localhost + "/r")
            assert ok.shape == (426, 640, 3) and len(files.requests) == 1
        finally:
            hop.close()


def test_error_messages_name_no_internal_detail(tmp_path):
    loader = ImageLoader(_settings(tmp_path, IMAGE_HOSTS_ALLOWED="127.0.0.1", IMAGE_FETCH_TIMEOUT_S="2"))
    long_url = f"http://127.0.0.1:{_free_port()}/" + "p" * 5000
    with pytest.raises(ImageLoadError) as e:
        loader.load(long_url)
    msg = str(e.value)
    assert "Errno" not in msg and "Connection refused" not in msg and len(msg) < QUOTE_CHARS + 150
    secret = Streamer(lambda h: (h.send_response(500), h.send_header("Content-Length", "12"), h.end_headers(),
                                 h.wfile.write(b"db password!")))
    try:
        with pytest.raises(ImageLoadError, match="HTTP 500") as e:
            loader.load(secret.url + "/x.jpg")
    finally:
        secret.close()
    assert "password" not in str(e.value)


def test_local_files_only_inside_the_roots(tmp_path, image_copy):
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(image_copy, root / "in.jpg")
    os.symlink("/etc/passwd", root / "passwd.jpg")
    os.symlink(image_copy, root / "out.jpg")  # an image, but outside the root
    loader = ImageLoader(Settings.from_env({"LOCAL_FILES_ROOTS": str(root)}))
    assert loader.load(str(root / "in.jpg")).shape == (426, 640, 3)
    for path in ("/etc/passwd", "/proc/self/environ", str(root / "passwd.jpg"), str(root / "out.jpg"),
                 f"{root}/../a.jpg", f"file://{root}/../a.jpg"):
        with pytest.raises(ImageLoadError, match="outside LOCAL_FILES_ROOTS"):
            loader.load(path)
    with pytest.raises(ImageLoadError, match="no LOCAL_FILES_ROOTS"):
        ImageLoader(Settings.from_env({})).load(str(root / "in.jpg"))


def test_label_studio_paths_cannot_climb_out(tmp_path, image_copy):
    with FileServer(tmp_path, token="tok") as ls:
        loader = ImageLoader(Settings.from_env({"LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": "tok"}))
        for path in ("/data/../etc/passwd", "/data/upload/../../etc/passwd", "/data/local-files/?d=../../etc/passwd",
                     "/data/local-files/?d=%2e%2e/%2e%2e/etc/passwd", f"{ls.url}/api/projects/",
                     f"{ls.url}/data/upload/%2e%2e/x"):
            with pytest.raises(ImageLoadError, match="not a Label Studio file path"):
                loader.load(path)
        assert ls.requests == []  # nothing, and no token, was sent
        assert loader.load("/data/upload/a.jpg").shape == (426, 640, 3)


# ---------------------------------------------------------------------------------------------- wrong or unclear answers
def test_a_16_bit_png_is_not_white(tmp_path):
    gray = (np.arange(426 * 640).reshape(426, 640) % 65536).astype(np.uint16)
    Image.fromarray(gray).save(tmp_path / "g16.png")
    image = ImageLoader(_settings(tmp_path)).load(str(tmp_path / "g16.png"))
    assert image.mean() < 200 and np.array_equal(image[:, :, 1], (gray >> 8).astype(np.uint8))


@pytest.mark.parametrize("config", [["<View/>"], {"xml": "<View/>"}, 42])
def test_a_label_config_that_is_not_a_string_is_400(tmp_path, config):
    r = _client(_settings(tmp_path)).post("/predict", json={"label_config": config, "tasks": [{"id": 1, "data": {}}]})
    assert r.status_code == 400 and r.is_json and "'label_config' must be the labeling config" in r.get_json()["error"]
    r = _client(_settings(tmp_path)).post("/setup", json={"project": 1, "schema": config})
    assert r.status_code == 400 and r.is_json and "'schema' must be" in r.get_json()["error"]


def test_a_bug_is_a_json_500_without_internal_detail(tmp_path, monkeypatch):
    client = _client(_settings(tmp_path))
    monkeypatch.setattr(client.application.extensions["sim_backend"]["predictor"], "predict",
                        lambda payload: 1 / 0)
    r = client.post("/predict", json={"tasks": [{"id": 1}]})
    assert r.status_code == 500 and r.is_json and r.get_json()["error"].startswith("internal error (ZeroDivisionError)")


def test_an_image_field_that_is_an_object_names_the_field(tmp_path):
    body = _predict(_client(_settings(tmp_path)), {"url": "x.jpg"}).get_json()
    err = body["results"][0]["error"]
    assert "data['image'] must be an image URL or path (a string), got dict" in err and "unhashable" not in err


def test_rectanglelabels_as_a_string_names_the_field(tmp_path, image_copy):
    rect = rect_item(LABEL, XYWH, 640, 426)
    rect["value"]["rectanglelabels"] = LABEL  # "tv", not ["tv"]
    body = _predict(_client(_settings(tmp_path)), str(image_copy), [rect]).get_json()
    reason = body["skipped"][0]["reason"]
    assert "value.rectanglelabels must be a list of label strings" in reason and "unknown label" not in reason


def test_a_list_context_is_refused_naming_it(tmp_path, image_copy):
    r = _client(_settings(tmp_path)).post("/predict", json={
        "label_config": coco_config(), "tasks": [{"id": 1, "data": {"image": str(image_copy)}}],
        "params": {"context": [rect_item(LABEL, XYWH, 640, 426)]}})
    assert r.status_code == 400 and "params.context must be a JSON object" in r.get_json()["error"]


def test_a_10_mb_image_path_is_not_echoed(tmp_path, caplog):
    client = _client(_settings(tmp_path))
    with caplog.at_level(logging.INFO, logger="sim_backend"):
        r = _predict(client, "/" + "z" * (10 * MIB))
    assert r.status_code == 200 and len(r.get_data()) < 2000
    assert max(len(rec.getMessage()) for rec in caplog.records) < 1000


# ---------------------------------------------------------------------------------------------- found in review
def _serve_bytes(data: bytes, **headers: str):
    def body(h):
        h.send_response(200)
        for k, v in {"Content-Length": str(len(data)), **headers}.items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)
    return body


def test_the_download_connects_to_the_checked_address_without_a_second_lookup(tmp_path, image_copy, monkeypatch):
    """DNS rebinding: a name that answers a checked address first and another one later."""
    real = socket.getaddrinfo
    asked = []

    def rebinding(host, *a, **kw):
        if host == "rebind.test":
            asked.append(host)
            if len(asked) > 1:  # a second lookup would go somewhere else
                raise socket.gaierror("rebound")
            return real("127.0.0.1", *a, **kw)
        return real(host, *a, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    server = Streamer(_serve_bytes(image_copy.read_bytes(), **{"Content-Type": "image/jpeg"}))
    hosts = []
    server_body = server._httpd.RequestHandlerClass.do_GET

    def record(h):
        hosts.append(h.headers.get("Host"))
        server_body(h)

    server._httpd.RequestHandlerClass.do_GET = record
    try:
        url = server.url.replace("127.0.0.1", "rebind.test") + "/a.jpg"
        image = ImageLoader(_settings(tmp_path, IMAGE_HOSTS_ALLOWED="127.0.0.1")).load(url)
    finally:
        server.close()
    assert image.shape == (426, 640, 3) and asked == ["rebind.test"]
    assert hosts == [url.split("/")[2]]  # the server was asked for the name, on the checked address


def test_a_web_image_cannot_redirect_into_label_studio(tmp_path, image_copy):
    with FileServer(tmp_path, token="tok") as ls:
        hop = Streamer(lambda h: (h.send_response(302), h.send_header("Location", ls.url + "/data/upload/a.jpg"),
                                  h.send_header("Content-Length", "0"), h.end_headers()))
        try:
            loader = ImageLoader(_settings(tmp_path, LABEL_STUDIO_URL=ls.url, LABEL_STUDIO_API_KEY="tok",
                                           IMAGE_HOSTS_ALLOWED="127.0.0.1"))
            with pytest.raises(ImageLoadError, match="redirects into Label Studio"):
                loader.load(hop.url + "/x.jpg")
        finally:
            hop.close()
        assert ls.requests == []  # the key never followed the stranger's link


def test_malformed_urls_are_image_errors(tmp_path):
    loader = ImageLoader(_settings(tmp_path, LABEL_STUDIO_URL="http://127.0.0.1:9", LABEL_STUDIO_API_KEY="k"))
    for field in ("http://x:99999/a.jpg", "http://[::1/a.jpg", "/data/upload/\x00a.jpg", "http://host/a\x00.jpg",
                  str(tmp_path / "a\x00.jpg")):
        with pytest.raises(ImageLoadError, match="malformed URL|control character"):
            loader.load(field)


@pytest.mark.parametrize("address, public", [("8.8.8.8", True), ("2606:4700:4700::1111", True),
                                             ("127.0.0.1", False), ("::ffff:127.0.0.1", False),
                                             ("64:ff9b::7f00:1", False), ("2002:7f00:1::1", False),
                                             ("2001:0:4136:e378::1", False), ("::127.0.0.1", False),
                                             ("169.254.169.254", False), ("fd00::1", False)])
def test_tunnelled_and_private_addresses_are_not_public(address, public):
    import ipaddress

    from sim_backend.images import is_public_address
    assert is_public_address(ipaddress.ip_address(address)) is public


def test_compressed_bodies_are_capped_after_decompression(tmp_path, image_copy):
    import gzip
    jpeg = image_copy.read_bytes()
    bomb = gzip.compress(b"\0" * (3 * MIB))  # ~3 KB on the wire
    servers = {name: Streamer(_serve_bytes(data, **{"Content-Encoding": enc}))
               for name, data, enc in (("ok", gzip.compress(jpeg), "gzip"), ("bomb", bomb, "gzip"),
                                       ("br", jpeg, "br"))}
    try:
        loader = ImageLoader(_settings(tmp_path, IMAGE_HOSTS_ALLOWED="127.0.0.1", MAX_IMAGE_BYTES=str(MIB)))
        assert loader.load(servers["ok"].url + "/a.jpg").shape == (426, 640, 3)
        assert servers["ok"].requests  # asked once, with Accept-Encoding: identity
        with pytest.raises(ImageLoadError, match="once decompressed"):
            loader.load(servers["bomb"].url + "/b.jpg")
        with pytest.raises(ImageLoadError, match="Content-Encoding"):
            loader.load(servers["br"].url + "/c.jpg")
    finally:
        for s in servers.values():
            s.close()


def test_only_common_image_formats_reach_a_decoder(tmp_path):
    import io

    from sim_backend.images import decode_image
    for fmt in ("ICO", "PCX", "TGA"):
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), (200, 10, 10)).save(buf, fmt)
        with pytest.raises(ImageLoadError, match="not a readable image"):
            decode_image(buf.getvalue(), 10**6)
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buf, "PNG")
    assert decode_image(buf.getvalue(), 10**6)[0, 0].tolist() == [200, 10, 10]


def test_a_hanging_dns_lookup_ends_at_the_fetch_deadline(tmp_path, monkeypatch):
    real = socket.getaddrinfo

    def slow(host, *a, **kw):
        if host == "slow.test":
            time.sleep(5)
        return real(host, *a, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", slow)
    t0 = time.monotonic()
    with pytest.raises(ImageLoadError, match="IMAGE_FETCH_DEADLINE_S") as e:
        ImageLoader(_settings(tmp_path, IMAGE_FETCH_DEADLINE_S="1")).load("http://slow.test/a.jpg")
    assert time.monotonic() - t0 < 3 and e.value.transient


def test_label_studio_under_a_subpath(tmp_path, image_copy):
    data = image_copy.read_bytes()

    def ls(h):
        if h.path == "/ls/data/upload/a.jpg" and h.headers.get("Authorization") == "Token tok":
            _serve_bytes(data)(h)
        else:
            h.send_error(404)

    server = Streamer(ls)
    try:
        loader = ImageLoader(_settings(tmp_path, LABEL_STUDIO_URL=server.url + "/ls", LABEL_STUDIO_API_KEY="tok"))
        assert loader.load("/data/upload/a.jpg").shape == (426, 640, 3)
        assert ImageLoader(loader.settings).load(server.url + "/ls/data/upload/a.jpg").shape == (426, 640, 3)
        with pytest.raises(ImageLoadError, match="not a Label Studio file path"):
            loader.load(server.url + "/ls/api/projects/")
    finally:
        server.close()
    assert [p for p, _ in server.requests] == ["/ls/data/upload/a.jpg"] * 2


def test_dead_servers_are_transient_refusals_are_not(tmp_path):
    loader = ImageLoader(_settings(tmp_path, IMAGE_HOSTS_ALLOWED="127.0.0.1", IMAGE_FETCH_TIMEOUT_S="2"))
    with pytest.raises(ImageLoadError) as dead:
        loader.load(f"http://127.0.0.1:{_free_port()}/a.jpg")
    missing = Streamer(lambda h: h.send_error(404))
    failing = Streamer(lambda h: h.send_error(503))
    try:
        with pytest.raises(ImageLoadError) as e404:
            loader.load(missing.url + "/a.jpg")
        with pytest.raises(ImageLoadError) as e503:
            loader.load(failing.url + "/a.jpg")
    finally:
        missing.close()
        failing.close()
    assert dead.value.transient and e503.value.transient and not e404.value.transient


def test_an_environment_key_never_goes_to_the_host_setup_names(tmp_path, image_copy):
    foreign = Streamer(lambda h: h.send_error(404))
    try:
        client = _client(_settings(tmp_path, LABEL_STUDIO_API_KEY="env-key", BASIC_AUTH_USER="u",
                                   BASIC_AUTH_PASS="p"))
        assert client.post("/setup", auth=("u", "p"), json={"project": 1, "schema": coco_config(),
                                                            "hostname": foreign.url, "access_token": "t"}).status_code == 200
        body = client.post("/predict", auth=("u", "p"), json={
            "label_config": coco_config(), "tasks": [{"id": 1, "data": {"image": "/data/upload/a.jpg"}}],
            "params": {"context": {"result": [rect_item(LABEL, XYWH, 640, 426)]}}}).get_json()
    finally:
        foreign.close()
    assert foreign.requests == [] and "not set" in body["errors"][0]["error"]


# ---------------------------------------------------------------------------------------------- a hostile probe, round 2
@pytest.mark.timeout(120)
def test_400_boxes_in_one_task_answer_by_the_deadline_with_the_rest_marked(tmp_path, image_copy):
    """Row 1: the deadline held only between tasks (400 GrabCut boxes answered at 30 s with a 10-s deadline)."""
    xy = np.random.default_rng(3).uniform(0, 1, (400, 2)) * [340, 150]
    rects = [rect_item(LABEL, [x, y, 300, 276], 640, 426, rid=f"r{i}") for i, (x, y) in enumerate(xy)]
    client = _client(_settings(tmp_path, REQUEST_DEADLINE_S="3", OUTPUT_BRUSH="false"))
    t0 = time.monotonic()
    body = _predict(client, str(image_copy), rects).get_json()
    took = time.monotonic() - t0
    late = [s["region"] for s in body["skipped"] if "deadline exceeded" in s["reason"]]
    assert late and all("REQUEST_DEADLINE_S=3.0" in s["reason"] for s in body["skipped"])
    assert took < 3 + 1.5, (took, len(late))  # the deadline plus about one box (and the request around it)
    assert body["results"][0]["result"] and len(late) < 400  # the boxes done keep their regions
    # the boxes not reached are the last ones, each marked once
    assert late == [f"r{i}" for i in range(400 - len(late), 400)]


def test_a_50_megapixel_16_bit_png_decodes_without_whole_image_int64_copies(tmp_path):
    """Row 2: a 97-kB 16-bit PNG of 7071 x 7071 px cost 1 GB (int64 copies of the whole image); numpy's share
    of the peak is now the 3-byte-per-pixel result and a strip."""
    side = 4000
    ramp = np.linspace(0, 65535, side).astype(np.uint16)
    Image.fromarray(np.broadcast_to(ramp, (side, side)).copy()).save(tmp_path / "g16.png")
    loader = ImageLoader(_settings(tmp_path))
    tracemalloc.start()
    image = loader.load(str(tmp_path / "g16.png"))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert image.shape == (side, side, 3) and np.array_equal(image[7, :, 2], (ramp >> 8).astype(np.uint8))
    assert peak < 3 * side * side + 16 * MIB, peak / MIB  # the result + a strip; before: > 16 bytes per pixel


def test_an_authorization_header_that_does_not_decode_is_401(tmp_path):
    """Row 3: ``Basic \\xff`` answered 500 with a traceback per request."""
    client = _client(_settings(tmp_path, BASIC_AUTH_USER="u", BASIC_AUTH_PASS="p"))
    for header in ("Basic \xff", "Basic \xff\xfe==", "Basic !!!", "Basic " + "w6k=", "Bearer \xff"):
        r = client.get("/versions", headers={"Authorization": header})
        assert r.status_code == 401 and "authentication required" in r.get_json()["error"], header


@pytest.mark.parametrize("path", ["/predict", "/setup", "/webhook", "/versions"])
@pytest.mark.parametrize("depth", [100, 5000])
def test_deeply_nested_json_is_400_naming_the_problem(tmp_path, path, depth):
    """Row 4: JSON nested 1000+ levels was a 500 RecursionError."""
    client = _client(_settings(tmp_path))
    body = '{"project": 1, "x": ' + "[" * depth + "]" * depth + "}"
    method = client.get if path == "/versions" else client.post
    r = method(path, data=body, content_type="application/json")
    assert r.status_code == 400 and "nested" in r.get_json()["error"] and "MAX_JSON_DEPTH=64" in r.get_json()["error"]


def _gunicorn(tmp_path: Path, **env: str):
    """The README's gunicorn (one worker) on a free port of 127.0.0.1, with ``env``; yields its base URL."""
    port = _free_port()
    full = dict(os.environ, MODEL_DIR=str(tmp_path / "models"), LOG_LEVEL="WARNING", **env)
    proc = subprocess.Popen([str(Path(sys.executable).parent / "gunicorn"), "sim_backend.wsgi:app", "-b",
                             f"127.0.0.1:{port}", "-w", "1", "--threads", "2", "--no-control-socket"],
                            cwd=REPO_ROOT, env=full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for _ in range(300):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            time.sleep(0.2)
    return proc, port


def _raw_request(port: int, head: bytes, body_chunks=()) -> tuple[int, dict, int]:
    """Send ``head`` then ``body_chunks`` (chunked encoding) until the server answers; (status, JSON, bytes sent)."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(head)
        sent = 0
        for chunk in body_chunks:
            if select.select([s], [], [], 0)[0]:
                break  # the server has answered: stop sending
            try:
                s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        else:
            if body_chunks:
                s.sendall(b"0\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < int(
                re.search(rb"(?i)content-length: *(\d+)", data).group(1)):
            more = s.recv(65536)
            if not more:
                break
            data += more
    head_part, body = data.split(b"\r\n\r\n", 1)
    return int(head_part.split()[1]), json.loads(body), sent


def test_on_the_wire_a_chunked_body_over_max_request_bytes_is_413_and_bad_auth_bytes_are_401(tmp_path):
    """Rows 5 and 3 through the README's gunicorn: a chunked body above MAX_REQUEST_BYTES was cut at the limit
    and answered 400 "not valid JSON" after 20 MB; ``Authorization: Basic \\xff`` was a 500 with a traceback."""
    proc, port = _gunicorn(tmp_path, MAX_REQUEST_BYTES=str(MIB), BASIC_AUTH_USER="u", BASIC_AUTH_PASS="p")
    auth = b"Authorization: Basic " + base64.b64encode(b"u:p") + b"\r\n"
    try:
        head = (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + auth
                + b"Transfer-Encoding: chunked\r\n\r\n")
        status, body, sent = _raw_request(port, head, (b" " * 65536 for _ in range(1024)))  # up to 64 MiB
        assert status == 413 and "MAX_REQUEST_BYTES=1048576" in body["error"], body
        assert sent < 32 * MIB, sent / MIB  # the answer came once the limit was reached, not after 64 MiB
        small = (b'{"tasks": []}',)
        status, body, _ = _raw_request(port, head, small)
        assert status == 400 and "no tasks" in body["error"]  # a chunked body under the limit is read
        for bad in (b"Basic \xff", b"Basic \xff\xfe==", b"Basic !!!"):
            status, body, _ = _raw_request(port, b"GET /versions HTTP/1.1\r\nHost: x\r\nAuthorization: " + bad
                                           + b"\r\nConnection: close\r\n\r\n")
            assert status == 401 and "authentication required" in body["error"], (bad, status, body)
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0].decode(errors="replace")
    assert "Traceback" not in out, out[-3000:]


def _png_header(width: int, height: int) -> bytes:
    """A PNG of ``width`` x ``height`` 1-bit pixels whose image data is cut off: Pillow opens it (header only)."""
    buf = io.BytesIO()
    Image.new("1", (8, 8)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = 8 + 8  # signature, then length + "IHDR"
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])))
    return bytes(data)


def test_max_image_pixels_governs_pillows_own_limit_and_is_named(tmp_path):
    """Row 6: above 178,956,970 px Pillow's bomb check fired first, with a message that named no setting."""
    (tmp_path / "big.png").write_bytes(_png_header(15000, 12000))  # 180 M px: above Pillow's default 2 x limit
    loader = ImageLoader(_settings(tmp_path, MAX_IMAGE_PIXELS="200000000"))
    with pytest.raises(ImageLoadError) as e:
        loader.load(str(tmp_path / "big.png"))
    assert "decompression bomb" not in str(e.value) and "not a readable image" in str(e.value)  # Pillow let it through
    shutil.copy(IMG, tmp_path / "a.jpg")
    small = ImageLoader(_settings(tmp_path, MAX_IMAGE_PIXELS="1000"))  # 640 x 426 is above 2 x 1000: Pillow's check
    with pytest.raises(ImageLoadError, match="more pixels than MAX_IMAGE_PIXELS=1000 allows"):
        small.load(str(tmp_path / "a.jpg"))
    with pytest.raises(ImageLoadError, match="above MAX_IMAGE_PIXELS=100000000"):
        ImageLoader(_settings(tmp_path, MAX_IMAGE_PIXELS="100000000")).load(str(tmp_path / "big.png"))


def _label_studio_with_projects(root: Path, *ids: int) -> "FileServer":
    """A stand-in Label Studio (unit test) that has the projects ``ids`` (GET /api/projects/<id>/)."""
    for i in ids:
        (root / "api" / "projects" / str(i)).mkdir(parents=True)
        (root / "api" / "projects" / str(i) / "index.html").write_text(json.dumps({"id": i, "title": f"p{i}"}))
    return FileServer(root, token="ls-key")


def test_start_training_for_a_project_label_studio_does_not_know_writes_nothing(tmp_path):
    """Row 7: START_TRAINING for a project that does not exist created MODEL_DIR/<id>/retrain.lock each time."""
    with _label_studio_with_projects(tmp_path / "ls", 7) as ls:
        settings = _settings(tmp_path, LABEL_STUDIO_URL=ls.url, LABEL_STUDIO_API_KEY="ls-key",
                             RETRAIN_EVERY_N_ANNOTATIONS="1", RETRAIN_ARGS="--timeout 2")
        client = _client(settings)
        for action in ("START_TRAINING", "ANNOTATION_CREATED"):
            r = client.post("/webhook", json={"action": action, "project": {"id": 4242}})
            assert r.status_code == 404 and "no project 4242" in r.get_json()["error"], r.get_json()
        assert not (settings.model_dir / "4242").exists()
        r = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 7}})
        assert r.status_code == 200 and r.get_json()["status"] == "started"
        assert ("/api/projects/4242/", "Token ls-key") in ls.requests
    unconfigured = _client(_settings(tmp_path))
    r = unconfigured.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 8}})
    assert r.status_code == 503 and "LABEL_STUDIO_URL" in r.get_json()["error"]
    assert not (tmp_path / "models" / "8").exists()
    _wait_for_no_retrain(settings.model_dir, "7")


def _wait_for_no_retrain(model_dir: Path, project: str) -> None:
    deadline = time.monotonic() + 120
    while ProjectLock(model_dir, project).is_held():
        assert time.monotonic() < deadline, "the retrain never ended"
        time.sleep(0.3)


@pytest.mark.parametrize("payload, reason", [
    ({"action": "START_TRAINING"}, "no project id"),
    ({"action": "START_TRAINING", "project": {"title": "x"}}, "no project id"),
    ({"action": "START_TRAINING", "project": "../../etc"}, "'../../etc' is not a Label Studio project id"),
    ({"action": "START_TRAINING", "project": {"id": "../../etc"}}, "is not a Label Studio project id"),
    ({"action": "START_TRAINING", "project": -1}, "'-1' is not a Label Studio project id"),
    ({"action": "ANNOTATION_CREATED", "task": {"project": "1; rm -rf /"}}, "is not a Label Studio project id"),
])
def test_a_malformed_webhook_payload_is_400_with_the_reason(tmp_path, payload, reason):
    """Row 8: a malformed webhook payload answered HTTP 200 {"status": "error"}."""
    client = _client(_settings(tmp_path, RETRAIN_EVERY_N_ANNOTATIONS="1"))
    r = client.post("/webhook", json=payload)
    assert r.status_code == 400 and reason in r.get_json()["error"], r.get_json()
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())
