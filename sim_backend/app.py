"""Flask app factory: the Label Studio ML backend routes (the protocol of Label Studio 1.23).

Routes:
    GET  /health    → 200 ``{"status": "UP", …}`` (no model work, no authentication).
    POST /setup     ``{project, schema, hostname, access_token}`` → ``{"model_version": …}``; 400 when
                    the schema lacks a box source or a mask target. Starts loading the project's model
                    in the background. ``hostname``/``access_token`` are used only with basic auth on and
                    LABEL_STUDIO_URL/_API_KEY unset (:meth:`ImageLoader.remember_label_studio`).
    POST /predict   ``{tasks, project, label_config, params}`` → ``{"results": [… one per task]}``
                    (:mod:`sim_backend.predict`); works without a prior /setup (multi-worker).
    POST /webhook   Label Studio events → :func:`sim_backend.webhook.on_webhook` (starts retrains).
    GET  /versions  ``?project=<id>`` → ``{"versions": [...], "current": …}``.

With BASIC_AUTH_USER / BASIC_AUTH_PASS set, every route but /health answers 401 without them (compared
in constant time; an Authorization header that does not even decode is a 401 too). Every error is a JSON
body ``{"status": "error", "error": …}``: 400 for a malformed request (a JSON body nested deeper than
MAX_JSON_DEPTH included), 401, 404 (a webhook for a project that Label Studio does not know), 405, 413
for a body above MAX_REQUEST_BYTES (by its Content-Length, or, for a chunked body, once the read reaches
the limit: no more is read), 503 when Label Studio cannot be asked, 500 (with no internal detail) for a
bug.
"""
from __future__ import annotations

import hmac
import json
import logging

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from .engines import EngineProvider
from .images import ImageLoader, quoted
from .label_config import LabelConfigError, parse_label_config
from .predict import BadRequest, Predictor, project_id
from .settings import Settings
from .webhook import WebhookError, label_studio_project_check, on_webhook

log = logging.getLogger(__name__)

#: Routes that answer without authentication (Label Studio and orchestrators probe them).
OPEN_PATHS = ("/health", "/")


def json_depth(value) -> int:
    """How deeply a parsed JSON value nests (a scalar: 0, ``[]``: 1, ``{"a": [1]}``: 2), without recursion."""
    depth, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            v = list(v.values())
        elif not isinstance(v, list):
            continue
        depth = max(depth, d)
        stack.extend((x, d + 1) for x in v if isinstance(x, (dict, list)))
    return depth


def _request_bytes(settings: Settings) -> bytes:
    """The request body, at most MAX_REQUEST_BYTES of it.

    Raises:
        werkzeug's RequestEntityTooLarge (413): a chunked body (no Content-Length) that reaches the limit.
            werkzeug's stream stops at the limit and ``get_data`` would return the cut body as if it were
            whole; one more byte asked of that stream raises instead.
    """
    raw = request.get_data(cache=True)
    if request.content_length is None and len(raw) >= settings.max_request_bytes:
        request.stream.read(1)  # past the limit: RequestEntityTooLarge
    return raw


def _json_body(settings: Settings, required: bool = True) -> dict | None:
    """The request's JSON object, or raise BadRequest with a clear message.

    Args:
        settings: ``max_request_bytes`` and ``max_json_depth``.
        required: whether an empty body is an error (else None).

    Raises:
        BadRequest: empty (when required), not JSON, nested deeper than MAX_JSON_DEPTH, not an object.
        RequestEntityTooLarge: a chunked body above MAX_REQUEST_BYTES (:func:`_request_bytes`).
    """
    raw = _request_bytes(settings)
    if not raw.strip():
        if required:
            raise BadRequest("the request body is empty; expected JSON")
        return None
    try:
        payload = json.loads(raw)
    except RecursionError:
        raise BadRequest(f"the request's JSON is nested too deeply (the limit is MAX_JSON_DEPTH="
                         f"{settings.max_json_depth} levels)") from None
    except ValueError:  # also a body that is not UTF-8
        raise BadRequest("the request body is not valid JSON") from None
    depth = json_depth(payload)
    if depth > settings.max_json_depth:
        raise BadRequest(f"the request's JSON is nested {depth} levels deep, more than MAX_JSON_DEPTH="
                         f"{settings.max_json_depth}")
    if not isinstance(payload, dict):
        raise BadRequest(f"the request body must be a JSON object, got {type(payload).__name__}")
    return payload


def _authorized(settings: Settings) -> bool:
    try:
        auth = request.authorization
    except ValueError:  # a header that does not decode (non-ASCII bytes, bad base64): no credentials
        return False
    if auth is None or auth.type != "basic":
        return False
    ok_user = hmac.compare_digest((auth.username or "").encode(), settings.basic_auth_user.encode())
    ok_pass = hmac.compare_digest((auth.password or "").encode(), settings.basic_auth_pass.encode())
    return ok_user and ok_pass


def _error(status: int, message: str) -> tuple[Response, int]:
    return jsonify({"status": "error", "error": message}), status


def create_app(settings: Settings | None = None, engine_provider: EngineProvider | None = None,
               image_loader: ImageLoader | None = None) -> Flask:
    """Build the backend's Flask app.

    Args:
        settings: defaults to :meth:`Settings.from_env`.
        engine_provider: defaults to :class:`EngineProvider` over ``settings.model_dir``.
        image_loader: defaults to :class:`ImageLoader` (tests may pass one with a session).

    Returns:
        the Flask app; ``app.extensions["sim_backend"]`` holds the settings, provider, loader and predictor.
    """
    settings = settings or Settings.from_env()
    engines = engine_provider or EngineProvider(settings)
    images = image_loader or ImageLoader(settings)
    predictor = Predictor(settings, engines, images)
    # the webhook asks Label Studio whether a project exists before writing anything for it; a retrain reads
    # from the Label Studio of the environment only (not one that /setup named)
    verify_project = label_studio_project_check(
        images.connection if settings.label_studio_url and settings.label_studio_api_key else None)

    app = Flask("sim_backend")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    app.extensions["sim_backend"] = {"settings": settings, "engines": engines, "images": images,
                                     "predictor": predictor}

    @app.before_request
    def _authenticate():
        if settings.basic_auth and request.path not in OPEN_PATHS and not _authorized(settings):
            resp, code = _error(401, "authentication required (HTTP basic auth: the backend's BASIC_AUTH_USER "
                                     "and BASIC_AUTH_PASS)")
            resp.headers["WWW-Authenticate"] = 'Basic realm="sim-prelabels"'
            return resp, code
        return None

    @app.errorhandler(BadRequest)
    def _bad_request(e: BadRequest):
        log.warning("400 %s %s: %s", request.method, request.path, e)
        return _error(400, str(e))

    @app.errorhandler(WebhookError)
    def _webhook_error(e: WebhookError):
        log.warning("%d %s %s: %s", e.status, request.method, request.path, e)
        return _error(e.status, str(e))

    @app.errorhandler(HTTPException)
    def _http_error(e: HTTPException):
        if e.code == 413:
            return _error(413, f"the request body is larger than MAX_REQUEST_BYTES={settings.max_request_bytes}")
        return _error(e.code or 500, e.description or e.name)

    @app.errorhandler(Exception)
    def _internal_error(e: Exception):
        log.exception("500 %s %s", request.method, request.path)
        return _error(500, f"internal error ({e.__class__.__name__}); see the backend's log")

    @app.get("/health")
    @app.get("/")
    def health():
        return jsonify({"status": "UP", "model_class": "SIMBoxToMaskBackend"})

    @app.post("/setup")
    def setup():
        payload = _json_body(settings)
        project = project_id(payload.get("project"))
        schema = payload.get("schema") or payload.get("label_config")
        if not schema:
            raise BadRequest("/setup needs the project's labeling config in 'schema'")
        if not isinstance(schema, str):
            raise BadRequest(f"'schema' must be the labeling config as an XML string, got {type(schema).__name__}")
        try:
            parse_label_config(schema)
        except LabelConfigError as e:
            raise BadRequest(str(e)) from e
        predictor.remember_config(project, schema)
        images.remember_label_studio(payload.get("hostname"), payload.get("access_token"))
        version = engines.model_version(project)
        if project is not None:
            engines.preload(project)
        return jsonify({"model_version": version})

    @app.post("/predict")
    def predict():
        return jsonify(predictor.predict(_json_body(settings)))

    @app.post("/webhook")
    def webhook():
        payload = _json_body(settings)
        try:
            answer = on_webhook(payload, settings, verify_project)
        except WebhookError:
            raise
        except Exception as e:
            log.exception("webhook %s failed", quoted(payload.get("action"), 40))
            return _error(500, f"webhook failed ({e.__class__.__name__}); see the backend's log")
        return jsonify(answer)

    @app.get("/versions")
    def versions():
        args = request.args.get("project")
        if args is None:
            body = _json_body(settings, required=False)
            args = body.get("project") if body is not None else None
        project = project_id(args)
        return jsonify({"project": project, "versions": engines.list_versions(project),
                        "current": engines.model_version(project)})

    return app
