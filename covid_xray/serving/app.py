"""The Flask app: an upload page and a JSON API over :class:`covid_xray.predict.PredictionService`.

Production: ``covid-xray serve`` (waitress). Development: ``flask --app covid_xray.serving.app run``
(Flask finds :func:`create_app`; settings come from ``COVID_XRAY_MODELS_DIR``,
``COVID_XRAY_MAX_UPLOAD_MB``, ``COVID_XRAY_MAX_PIXELS`` and ``COVID_XRAY_OOD_TOLERANCE``).
Uploads are read into memory and decoded by content; nothing is written under the client's file
name, and every bad input gets a JSON error, never a stack trace.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from typing import Any

from flask import Flask, Response, current_app, jsonify, render_template, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from covid_xray.imaging import MAX_PIXELS_DEFAULT
from covid_xray.predict import DISCLAIMER, InputError, PredictionService

log = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_MB = 10.0
SERVICE_KEY = "covid_xray.service"


def _settings(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """Defaults, then environment variables, then the explicit ``config`` mapping."""
    settings: dict[str, Any] = {
        "MODELS_DIR": os.environ.get("COVID_XRAY_MODELS_DIR", "models"),
        "MAX_UPLOAD_MB": float(os.environ.get("COVID_XRAY_MAX_UPLOAD_MB",
                                              DEFAULT_MAX_UPLOAD_MB)),
        "MAX_PIXELS": int(os.environ.get("COVID_XRAY_MAX_PIXELS", MAX_PIXELS_DEFAULT)),
        "OOD_TOLERANCE": float(os.environ.get("COVID_XRAY_OOD_TOLERANCE", 1.0)),
        "SERVICE": None,
    }
    settings.update(config or {})
    return settings


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build the app and load the models once (warmed up); a bad model file raises at once.

    ``config`` keys: ``MODELS_DIR``, ``MAX_UPLOAD_MB`` (413 beyond it), ``MAX_PIXELS`` (decoded
    pixel cap, 400 beyond it), ``OOD_TOLERANCE`` (scales the feature-distance limit),
    ``SERVICE`` (an already loaded :class:`PredictionService`, so tests and the benchmark do not
    reload models), plus any Flask setting.
    """
    settings = _settings(config)
    app = Flask(__name__)
    app.config.update({k: v for k, v in settings.items() if k != "SERVICE"})
    app.config["MAX_CONTENT_LENGTH"] = int(float(settings["MAX_UPLOAD_MB"]) * 1024 * 1024)
    app.json.sort_keys = False
    service = settings["SERVICE"] or PredictionService.load(
        settings["MODELS_DIR"], max_pixels=int(settings["MAX_PIXELS"]),
        ood_tolerance=float(settings["OOD_TOLERANCE"]))
    app.extensions[SERVICE_KEY] = service
    _register_routes(app)
    _register_errors(app)
    return app


def _service() -> PredictionService:
    return current_app.extensions[SERVICE_KEY]


def _error(status: int, message: str) -> tuple[Response, int]:
    return jsonify({"error": message, "status": status}), status


def _read_upload() -> bytes:
    """The image bytes from a multipart field ``file`` or, otherwise, the raw request body."""
    if request.mimetype == "multipart/form-data":
        if not request.mimetype_params.get("boundary"):
            raise InputError("malformed multipart request: the Content-Type has no boundary")
        try:
            files = request.files
        except ValueError as exc:
            raise InputError(f"malformed multipart request: {exc}") from exc
        upload = files.get("file")
        if upload is None:
            raise InputError("malformed multipart request or no field named 'file': send the "
                             "image as multipart field 'file' (or as the raw request body)")
        return upload.read()
    if request.mimetype == "application/x-www-form-urlencoded":
        raise InputError("a form-encoded body cannot carry an image: send it as multipart "
                         "field 'file' or as the raw request body", 415)
    return request.get_data(cache=False)


def _register_routes(app: Flask) -> None:
    @app.get("/")
    def index() -> str:
        service = _service()
        return render_template("index.html", disclaimer=DISCLAIMER,
                               max_upload_mb=app.config["MAX_UPLOAD_MB"],
                               models=[m.name for m in service.models])

    @app.post("/api/predict")
    def api_predict() -> Response | tuple[Response, int]:
        start = time.perf_counter()
        data = _read_upload()
        gradcam = request.args.get("gradcam", "").lower() in ("1", "true", "yes")
        result = _service().predict_bytes(data, gradcam=gradcam)
        result["timing_ms"]["request"] = round((time.perf_counter() - start) * 1000, 2)
        return jsonify(result)

    @app.get("/healthz")
    def healthz() -> Response | tuple[Response, int]:
        service = current_app.extensions.get(SERVICE_KEY)
        if service is None:  # pragma: no cover - create_app never leaves it unset
            return _error(503, "models not loaded")
        return jsonify(service.health())

    @app.after_request
    def security_headers(response: Response) -> Response:
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        response.headers.setdefault(
            "Content-Security-Policy",
            "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; "
            "base-uri 'none'; frame-ancestors 'none'")
        return response


def _register_errors(app: Flask) -> None:
    @app.errorhandler(InputError)
    def input_error(exc: InputError) -> tuple[Response, int]:
        return _error(exc.status, str(exc))

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(_exc: RequestEntityTooLarge) -> tuple[Response, int]:
        return _error(413, f"upload too large: the limit is {app.config['MAX_UPLOAD_MB']:g} MB")

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> tuple[Response, int]:
        return _error(exc.code or 500, exc.description or exc.name)

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> tuple[Response, int]:
        log.exception("unexpected error on %s %s", request.method, request.path)
        return _error(500, "internal error while processing the request; see the server log")
