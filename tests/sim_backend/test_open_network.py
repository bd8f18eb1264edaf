"""Every row of what a stock Label Studio and an open network did to the backend, one test each.

The settings come from environment-variable mappings (``Settings.from_env``), the requests go through the
real Flask app (or the real image loader), and the servers are real HTTP servers on 127.0.0.1.
"""
from __future__ import annotations

import http.server
import logging
import os
import shutil
import socket
import threading
import time
import tracemalloc
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
