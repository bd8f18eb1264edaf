"""Flask app factory: the Label Studio ML backend routes (the protocol of Label Studio 1.23).

Routes:
    GET  /health    → 200 ``{"status": "UP", "model_class": …}`` (no model work).
    POST /setup     ``{project, schema, hostname, access_token}`` → ``{"model_version": …}``; 400 when
                    the schema lacks a box source or a mask target. Starts loading the project's model
                    in the background.
    POST /predict   ``{tasks, project, label_config, params}`` → ``{"results": [… one per task]}``
                    (see :mod:`sim_backend.predict`); works without a prior /setup (multi-worker).
    POST /webhook   Label Studio events → :func:`sim_backend.webhook.on_webhook` (starts retrains).
    GET  /versions  ``?project=<id>`` → ``{"versions": [...], "current": …}``.

Malformed JSON and requests without tasks are answered 400 with a message.
"""
from __future__ import annotations

import logging

from flask import Flask, jsonify, request

from .engines import EngineProvider
from .images import ImageLoader
from .label_config import LabelConfigError, parse_label_config
from .predict import BadRequest, Predictor, project_id
from .settings import Settings
from .webhook import on_webhook

log = logging.getLogger(__name__)


def _json_body():
    """The request's JSON object, or raise BadRequest with a clear message."""
    payload = request.get_json(force=True, silent=True)
    if payload is None:
        raw = request.get_data(cache=True)
        if not raw:
            raise BadRequest("the request body is empty; expected JSON")
        raise BadRequest("the request body is not valid JSON")
    if not isinstance(payload, dict):
        raise BadRequest(f"the request body must be a JSON object, got {type(payload).__name__}")
    return payload


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

    app = Flask("sim_backend")
    app.extensions["sim_backend"] = {"settings": settings, "engines": engines, "images": images,
                                     "predictor": predictor}

    @app.errorhandler(BadRequest)
    def _bad_request(e: BadRequest):
        log.warning("400 %s %s: %s", request.method, request.path, e)
        return jsonify({"status": "error", "error": str(e)}), 400

    @app.get("/health")
    @app.get("/")
    def health():
        return jsonify({"status": "UP", "model_class": "SIMBoxToMaskBackend"})

    @app.post("/setup")
    def setup():
        payload = _json_body()
        project = project_id(payload.get("project"))
        schema = payload.get("schema") or payload.get("label_config")
        if not schema:
            raise BadRequest("/setup needs the project's labeling config in 'schema'")
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
        return jsonify(predictor.predict(_json_body()))

    @app.post("/webhook")
    def webhook():
        payload = _json_body()
        try:
            answer = on_webhook(payload, settings)
        except Exception as e:
            log.exception("webhook %s failed", payload.get("action"))
            return jsonify({"status": "error", "error": f"{e.__class__.__name__}: {e}"}), 500
        return jsonify(answer if isinstance(answer, dict) else {"status": "ok", "result": answer})

    @app.get("/versions")
    def versions():
        args = request.args.get("project")
        if args is None:
            body = request.get_json(silent=True)
            args = body.get("project") if isinstance(body, dict) else None
        project = project_id(args)
        return jsonify({"project": project, "versions": engines.list_versions(project),
                        "current": engines.model_version(project)})

    return app
