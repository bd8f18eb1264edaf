"""Task image loading (sim_backend.images): local files under the roots, web URLs, Label Studio's files with a
legacy token or a Personal Access Token, EXIF and 16-bit images, the byte-bounded cache, clear errors."""
import shutil
import socket

import numpy as np
import pytest
from PIL import Image

from sim_backend.images import ImageLoader, ImageLoadError, decode_image
from sim_backend.settings import Settings, SettingsError
from tests.support import COCO_VAL_IMAGES, FileServer, jwt_token

IMG = COCO_VAL_IMAGES / "000000000139.jpg"  # 640 x 426
LOCAL = Settings(local_files_roots=(COCO_VAL_IMAGES.resolve(),))
LOOPBACK_OK = Settings(image_hosts_allowed=("127.0.0.1",), image_fetch_timeout_s=2)


def _expected():
    return np.asarray(Image.open(IMG).convert("RGB"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _roots(*dirs) -> Settings:
    return Settings(local_files_roots=tuple(d.resolve() for d in dirs))


def test_local_path_and_file_url():
    loader = ImageLoader(LOCAL)
    a = loader.load(str(IMG))
    assert a.shape == (426, 640, 3) and a.dtype == np.uint8
    assert np.array_equal(a, _expected())
    assert np.array_equal(ImageLoader(LOCAL).load(IMG.as_uri()), a)


def test_web_url_is_fetched_without_token_and_cached(tmp_path):
    shutil.copy(IMG, tmp_path / "a.jpg")
    with FileServer(tmp_path) as srv:
        s = Settings(label_studio_url="http://ls.invalid:8080", label_studio_api_key="secret",
                     image_hosts_allowed=("127.0.0.1",))
        loader = ImageLoader(s)
        a = loader.load(f"{srv.url}/a.jpg")
        b = loader.load(f"{srv.url}/a.jpg#top".replace("http://", "HTTP://"))  # another spelling, one image
    assert np.array_equal(a, _expected())
    assert b is a                              # second load from the cache
    assert srv.requests == [("/a.jpg", None)]  # one request; the token is not sent to other hosts


def test_label_studio_urls_send_the_legacy_token(tmp_path):
    (tmp_path / "sub").mkdir()
    shutil.copy(IMG, tmp_path / "sub" / "b.jpg")
    shutil.copy(IMG, tmp_path / "c.jpg")
    with FileServer(tmp_path, token="s3cret") as srv:
        loader = ImageLoader(Settings(label_studio_url=srv.url, label_studio_api_key="s3cret"))
        a = loader.load("/data/local-files/?d=sub/b.jpg")
        b = loader.load("/data/upload/c.jpg")
        c = loader.load(f"{srv.url}/data/upload/c.jpg")   # absolute URL on Label Studio: the same image
        assert np.array_equal(a, _expected()) and np.array_equal(b, a) and c is b
        assert all(auth == "Token s3cret" for _, auth in srv.requests) and len(srv.requests) == 2
        wrong = ImageLoader(Settings(label_studio_url=srv.url, label_studio_api_key="wrong"))
        with pytest.raises(ImageLoadError, match="HTTP 401.*LABEL_STUDIO_API_KEY.*legacy token"):
            wrong.load("/data/upload/c.jpg")


def test_a_personal_access_token_is_exchanged_renewed_and_retried(tmp_path):
    """Label Studio 1.23's default: the PAT is exchanged for short-lived access tokens (label-studio-sdk's
    client), sent as Bearer, renewed when close to expiry, and exchanged again once after a 401."""
    shutil.copy(IMG, tmp_path / "c.jpg")
    pat = jwt_token("refresh", 3600 * 24 * 365)
    with FileServer(tmp_path, pat=pat, access_lifetime_s=3600) as srv:
        loader = ImageLoader(Settings(label_studio_url=srv.url, label_studio_api_key=pat, image_cache_bytes=0))
        assert loader.connection.kind == "personal access token"
        for _ in range(3):
            assert loader.load("/data/upload/c.jpg").shape == (426, 640, 3)
        assert srv.refreshes == 1  # one exchange, the access token reused
        assert {auth.split()[0] for _, auth in srv.requests} == {"Bearer"} and pat not in str(srv.requests)
        srv.reject_next = 1        # the access token is revoked: one 401, a new exchange, the retry succeeds
        assert loader.load("/data/upload/c.jpg").shape == (426, 640, 3)
        assert srv.refreshes == 2
    with FileServer(tmp_path, pat=pat, access_lifetime_s=20) as srv:  # shorter than the renewal margin
        loader = ImageLoader(Settings(label_studio_url=srv.url, label_studio_api_key=pat, image_cache_bytes=0))
        loader.load("/data/upload/c.jpg")
        loader.load("/data/upload/c.jpg")
        assert srv.refreshes >= 2  # renewed before use, not after a failure
        assert all(code is not None for _, code in srv.requests)
    with FileServer(tmp_path, pat=jwt_token("refresh", 3600)) as srv:  # a PAT of another Label Studio
        loader = ImageLoader(Settings(label_studio_url=srv.url, label_studio_api_key=pat))
        with pytest.raises(ImageLoadError, match="refused exchanging the personal access token.*HTTP 401"):
            loader.load("/data/upload/c.jpg")


def test_label_studio_path_without_url_is_a_clear_error():
    with pytest.raises(ImageLoadError, match="LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY are not set"):
        ImageLoader(Settings()).load("/data/upload/1/x.jpg")


def test_setup_hostname_and_token_are_used_only_with_basic_auth(tmp_path):
    shutil.copy(IMG, tmp_path / "c.jpg")
    with FileServer(tmp_path, token="tok") as srv:
        anonymous = ImageLoader(Settings())
        assert anonymous.remember_label_studio(srv.url + "/", "tok") is False
        with pytest.raises(ImageLoadError, match="not set"):
            anonymous.load("/data/upload/c.jpg")
        authed = ImageLoader(Settings(basic_auth_user="u", basic_auth_pass="p"))
        assert authed.remember_label_studio(srv.url + "/", "tok") is True
        assert authed.load("/data/upload/c.jpg").shape == (426, 640, 3)
        env = ImageLoader(Settings(label_studio_url=srv.url, label_studio_api_key="tok", basic_auth_user="u",
                                   basic_auth_pass="p"))
        assert env.remember_label_studio("http://evil.example", "other") is False  # never replaces the environment
        assert env.connection.url == srv.url and env.connection.api_key == "tok"


def test_exif_orientation_is_applied(tmp_path):
    im = Image.open(IMG).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": stored landscape, shown portrait
    im.save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    a = ImageLoader(_roots(tmp_path)).load(str(tmp_path / "rot.jpg"))
    assert a.shape == (640, 426, 3)
    ref = np.rot90(np.asarray(Image.open(tmp_path / "rot.jpg").convert("RGB")), k=-1)
    assert np.abs(a.astype(int) - ref.astype(int)).mean() < 1.0


def test_16_bit_and_float_images_are_scaled_to_8_bits(tmp_path):
    ramp = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0 … 65520
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    a = ImageLoader(_roots(tmp_path)).load(str(tmp_path / "g16.png"))
    assert a.dtype == np.uint8 and a.shape == (64, 64, 3)
    assert np.array_equal(a[:, :, 0], (ramp >> 8).astype(np.uint8)) and (a[:, :, 0] == a[:, :, 2]).all()
    assert a.min() == 0 and a.max() == 255 and 100 < a.mean() < 155  # not all white
    f = Image.fromarray(np.linspace(0, 1, 100, dtype=np.float32).reshape(10, 10), mode="F")
    buf = tmp_path / "f.tif"
    f.save(buf)
    b = decode_image(buf.read_bytes(), 10_000)
    assert b[0, 0, 0] == 0 and b[-1, -1, 0] == 255


def test_broken_file_is_a_clear_error(tmp_path):
    data = IMG.read_bytes()
    (tmp_path / "broken.jpg").write_bytes(data[: len(data) // 3])
    (tmp_path / "text.jpg").write_bytes(b"not an image at all")
    loader = ImageLoader(_roots(tmp_path))
    with pytest.raises(ImageLoadError, match="not a readable image"):
        loader.load(str(tmp_path / "broken.jpg"))
    with pytest.raises(ImageLoadError, match="not a readable image"):
        loader.load(str(tmp_path / "text.jpg"))
    with pytest.raises(ImageLoadError, match="cannot read image file"):
        loader.load(str(tmp_path / "missing.jpg"))


def test_oversized_image_is_refused_before_decoding():
    loader = ImageLoader(Settings(max_image_pixels=640 * 426 - 1, local_files_roots=LOCAL.local_files_roots))
    with pytest.raises(ImageLoadError, match="above MAX_IMAGE_PIXELS"):
        loader.load(str(IMG))
    assert ImageLoader(LOCAL).load(str(IMG)).shape == (426, 640, 3)


def test_unreachable_url_and_http_errors(tmp_path):
    loader = ImageLoader(LOOPBACK_OK)
    with pytest.raises(ImageLoadError, match="cannot fetch .*connection failed") as e:
        loader.load(f"http://127.0.0.1:{_free_port()}/x.jpg")
    assert "refused" not in str(e.value).lower().split("connection failed")[1]  # no OS error text
    with FileServer(tmp_path) as srv:
        with pytest.raises(ImageLoadError, match="HTTP 404"):
            loader.load(f"{srv.url}/nope.jpg")
    with pytest.raises(ImageLoadError, match="unsupported image URL scheme 's3'"):
        loader.load("s3://bucket/x.jpg")
    with pytest.raises(ImageLoadError, match="non-empty string"):
        loader.load("")


def test_cache_is_bounded_in_bytes_and_evicts_the_oldest(tmp_path):
    for n in "abc":
        shutil.copy(IMG, tmp_path / f"{n}.jpg")
    one = 640 * 426 * 3
    loader = ImageLoader(Settings(image_cache_bytes=2 * one + 10, local_files_roots=(tmp_path.resolve(),)))
    a = loader.load(str(tmp_path / "a.jpg"))
    loader.load(str(tmp_path / "b.jpg"))
    assert loader.load(str(tmp_path / "a.jpg")) is a       # hit; a becomes the newest
    loader.load(str(tmp_path / "c.jpg"))                     # evicts b
    assert loader.cache_bytes == 2 * one
    (tmp_path / "b.jpg").unlink()
    with pytest.raises(ImageLoadError):
        loader.load(str(tmp_path / "b.jpg"))
    assert loader.load(str(tmp_path / "a.jpg")) is a
    assert ImageLoader(Settings(image_cache_bytes=one - 1, local_files_roots=(tmp_path.resolve(),))).cache_bytes == 0


def test_settings_from_env_parses_and_refuses_bad_values(tmp_path):
    s = Settings.from_env({"LABEL_STUDIO_URL": "http://ls:8080/", "LABEL_STUDIO_API_KEY": "k",
                           "MODEL_DIR": str(tmp_path), "POLYGON_TOLERANCE_PX": "2.5", "MAX_IMAGE_PIXELS": "1000",
                           "IMAGE_CACHE_BYTES": "0", "IMAGE_FETCH_TIMEOUT_S": "3", "OUTPUT_BRUSH": "false",
                           "LOG_LEVEL": "debug", "LOCAL_FILES_ROOTS": f"{tmp_path}:{tmp_path}/",
                           "IMAGE_HOSTS_ALLOWED": "Images.Example.com, 10.0.0.0/8", "MAX_CONCURRENT_RETRAINS": "2",
                           "BASIC_AUTH_USER": "ls", "BASIC_AUTH_PASS": "pw", "REQUEST_DEADLINE_S": "50"})
    assert (s.label_studio_url, s.label_studio_api_key, s.model_dir) == ("http://ls:8080", "k", tmp_path)
    assert (s.polygon_tolerance_px, s.max_image_pixels, s.image_cache_bytes) == (2.5, 1000, 0)
    assert (s.image_fetch_timeout_s, s.output_brush, s.log_level) == (3.0, False, "DEBUG")
    assert s.local_files_roots == (tmp_path.resolve(), tmp_path.resolve())
    assert s.image_hosts_allowed == ("images.example.com", "10.0.0.0/8")
    assert s.basic_auth and s.max_concurrent_retrains == 2 and s.request_deadline_s == 50.0
    assert Settings.from_env({}) == Settings()
    for env, name in (({"POLYGON_TOLERANCE_PX": "abc"}, "POLYGON_TOLERANCE_PX"),
                      ({"OUTPUT_BRUSH": "maybe"}, "OUTPUT_BRUSH"), ({"MAX_IMAGE_PIXELS": "0"}, "MAX_IMAGE_PIXELS"),
                      ({"LOCAL_FILES_ROOTS": str(tmp_path / "nope")}, "LOCAL_FILES_ROOTS"),
                      ({"IMAGE_HOSTS_ALLOWED": "10.0.0.0/99"}, "IMAGE_HOSTS_ALLOWED"),
                      ({"BASIC_AUTH_USER": "only"}, "BASIC_AUTH_PASS"), ({"MASK_THRESHOLD": "0"}, "MASK_THRESHOLD")):
        with pytest.raises(SettingsError, match=name):
            Settings.from_env(env)
