"""Task image loading (sim_backend.images): local files, http, Label Studio URLs with token, EXIF, errors."""
import shutil
import socket

import numpy as np
import pytest
from PIL import Image

from sim_backend.images import ImageLoader, ImageLoadError
from sim_backend.settings import Settings, SettingsError
from tests.support import COCO_VAL_IMAGES, FileServer

IMG = COCO_VAL_IMAGES / "000000000139.jpg"  # 640 x 426


def _expected():
    return np.asarray(Image.open(IMG).convert("RGB"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_local_path_and_file_url():
    loader = ImageLoader(Settings())
    a = loader.load(str(IMG))
    assert a.shape == (426, 640, 3) and a.dtype == np.uint8
    assert np.array_equal(a, _expected())
    assert np.array_equal(ImageLoader(Settings()).load(IMG.as_uri()), a)


def test_http_url_is_fetched_without_token_and_cached(tmp_path):
    shutil.copy(IMG, tmp_path / "a.jpg")
    with FileServer(tmp_path) as srv:
        loader = ImageLoader(Settings(label_studio_url="http://ls.invalid:8080", label_studio_api_key="secret"))
        a = loader.load(f"{srv.url}/a.jpg")
        b = loader.load(f"{srv.url}/a.jpg")
    assert np.array_equal(a, _expected())
    assert b is a                              # second load from the LRU cache
    assert srv.requests == [("/a.jpg", None)]  # one request; the token is not sent to other hosts


def test_label_studio_urls_send_the_token(tmp_path):
    (tmp_path / "sub").mkdir()
    shutil.copy(IMG, tmp_path / "sub" / "b.jpg")
    shutil.copy(IMG, tmp_path / "c.jpg")
    with FileServer(tmp_path, token="s3cret") as srv:
        loader = ImageLoader(Settings(label_studio_url=srv.url, label_studio_api_key="s3cret"))
        a = loader.load("/data/local-files/?d=sub/b.jpg")
        b = loader.load("/data/upload/c.jpg")
        c = loader.load(f"{srv.url}/data/upload/c.jpg")   # absolute URL on Label Studio: token too
        assert np.array_equal(a, _expected()) and np.array_equal(b, a) and np.array_equal(c, a)
        assert all(auth == "Token s3cret" for _, auth in srv.requests)
        wrong = ImageLoader(Settings(label_studio_url=srv.url, label_studio_api_key="wrong"))
        with pytest.raises(ImageLoadError, match="HTTP 401.*LABEL_STUDIO_API_KEY"):
            wrong.load("/data/upload/c.jpg")


def test_label_studio_path_without_url_is_a_clear_error():
    with pytest.raises(ImageLoadError, match="LABEL_STUDIO_URL is not set"):
        ImageLoader(Settings()).load("/data/upload/1/x.jpg")


def test_setup_hostname_and_token_are_a_fallback(tmp_path):
    shutil.copy(IMG, tmp_path / "c.jpg")
    with FileServer(tmp_path, token="tok") as srv:
        loader = ImageLoader(Settings())
        loader.remember_label_studio(srv.url + "/", "tok")
        assert loader.load("/data/upload/c.jpg").shape == (426, 640, 3)


def test_exif_orientation_is_applied(tmp_path):
    im = Image.open(IMG).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": stored landscape, shown portrait
    im.save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    a = ImageLoader(Settings()).load(str(tmp_path / "rot.jpg"))
    assert a.shape == (640, 426, 3)
    ref = np.rot90(np.asarray(Image.open(tmp_path / "rot.jpg").convert("RGB")), k=-1)
    assert np.abs(a.astype(int) - ref.astype(int)).mean() < 1.0


def test_broken_file_is_a_clear_error(tmp_path):
    data = IMG.read_bytes()
    (tmp_path / "broken.jpg").write_bytes(data[: len(data) // 3])
    (tmp_path / "text.jpg").write_bytes(b"not an image at all")
    loader = ImageLoader(Settings())
    with pytest.raises(ImageLoadError, match="not a readable image"):
        loader.load(str(tmp_path / "broken.jpg"))
    with pytest.raises(ImageLoadError, match="not a readable image"):
        loader.load(str(tmp_path / "text.jpg"))
    with pytest.raises(ImageLoadError, match="cannot read image file"):
        loader.load(str(tmp_path / "missing.jpg"))


def test_oversized_image_is_refused_before_decoding():
    loader = ImageLoader(Settings(max_image_pixels=640 * 426 - 1))
    with pytest.raises(ImageLoadError, match="above MAX_IMAGE_PIXELS"):
        loader.load(str(IMG))
    assert ImageLoader(Settings(max_image_pixels=640 * 426)).load(str(IMG)).shape == (426, 640, 3)


def test_unreachable_url_and_http_errors(tmp_path):
    loader = ImageLoader(Settings(image_fetch_timeout_s=2))
    with pytest.raises(ImageLoadError, match="cannot fetch"):
        loader.load(f"http://127.0.0.1:{_free_port()}/x.jpg")
    with FileServer(tmp_path) as srv:
        with pytest.raises(ImageLoadError, match="HTTP 404"):
            loader.load(f"{srv.url}/nope.jpg")
    with pytest.raises(ImageLoadError, match="unsupported image URL scheme 's3'"):
        loader.load("s3://bucket/x.jpg")
    with pytest.raises(ImageLoadError, match="empty"):
        loader.load("")


def test_lru_cache_evicts_oldest(tmp_path):
    for n in "abc":
        shutil.copy(IMG, tmp_path / f"{n}.jpg")
    loader = ImageLoader(Settings(image_cache_size=2))
    a = loader.load(str(tmp_path / "a.jpg"))
    loader.load(str(tmp_path / "b.jpg"))
    assert loader.load(str(tmp_path / "a.jpg")) is a       # hit; a becomes the newest
    loader.load(str(tmp_path / "c.jpg"))                     # evicts b
    (tmp_path / "b.jpg").unlink()
    with pytest.raises(ImageLoadError):
        loader.load(str(tmp_path / "b.jpg"))
    assert loader.load(str(tmp_path / "a.jpg")) is a


def test_settings_from_env_parses_and_refuses_bad_values(tmp_path):
    s = Settings.from_env({"LABEL_STUDIO_URL": "http://ls:8080/", "LABEL_STUDIO_API_KEY": "k",
                           "MODEL_DIR": str(tmp_path), "POLYGON_TOLERANCE_PX": "2.5", "MAX_IMAGE_PIXELS": "1000",
                           "IMAGE_CACHE_SIZE": "0", "IMAGE_FETCH_TIMEOUT_S": "3", "OUTPUT_BRUSH": "false",
                           "LOG_LEVEL": "debug"})
    assert (s.label_studio_url, s.label_studio_api_key, s.model_dir) == ("http://ls:8080", "k", tmp_path)
    assert (s.polygon_tolerance_px, s.max_image_pixels, s.image_cache_size) == (2.5, 1000, 0)
    assert (s.image_fetch_timeout_s, s.output_brush, s.log_level) == (3.0, False, "DEBUG")
    assert Settings.from_env({}) == Settings()
    with pytest.raises(SettingsError, match="POLYGON_TOLERANCE_PX"):
        Settings.from_env({"POLYGON_TOLERANCE_PX": "abc"})
    with pytest.raises(SettingsError, match="OUTPUT_BRUSH"):
        Settings.from_env({"OUTPUT_BRUSH": "maybe"})
    with pytest.raises(SettingsError, match="MAX_IMAGE_PIXELS"):
        Settings.from_env({"MAX_IMAGE_PIXELS": "0"})
