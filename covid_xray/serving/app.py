"""The Flask app: an upload page and a JSON API over :class:`covid_xray.predict.PredictionService`.

Production: ``covid-xray serve`` (waitress). Development: ``flask --app covid_xray.serving.app run``
(Flask finds :func:`create_app`; settings come from ``COVID_XRAY_MODELS_DIR``,
``COVID_XRAY_MAX_UPLOAD_MB``, ``COVID_XRAY_MAX_PIXELS``, ``COVID_XRAY_OOD_TOLERANCE``,
``COVID_XRAY_MAX_DECODED_MB`` and ``COVID_XRAY_DECODE_SLOTS``).
Uploads are read into memory and decoded by content; nothing is written under the client's file
name, and every bad input the app sees gets a JSON error naming its cause, never a stack trace.
Limits and their validation: :mod:`covid_xray.serving.settings`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from typing import Any

from flask import Flask, Response, current_app, jsonify, render_template, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge
from werkzeug.sansio.multipart import Data, Epilogue, Field, File, MultipartDecoder, State

from covid_xray.imaging import MAX_DECODED_BYTES_DEFAULT, MAX_PIXELS_DEFAULT
from covid_xray.predict import DISCLAIMER, InputError, PredictionService
from covid_xray.serving import settings as limits

log = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_MB = limits.DEFAULT_MAX_UPLOAD_MB
SERVICE_KEY = "covid_xray.service"
_CHECKS = {"MAX_UPLOAD_MB": limits.max_upload_mb, "MAX_PIXELS": limits.max_pixels,
           "OOD_TOLERANCE": limits.ood_tolerance, "MAX_DECODED_MB": limits.max_decoded_mb,
           "DECODE_SLOTS": limits.decode_slots}


def _settings(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """Defaults, then environment variables, then the explicit ``config`` mapping; checked.

    A bad value raises :class:`~covid_xray.serving.settings.SettingError` naming the variable
    (``COVID_XRAY_MAX_UPLOAD_MB``) or the config key.
    """
    settings: dict[str, Any] = {"MODELS_DIR": "models", "MAX_UPLOAD_MB": DEFAULT_MAX_UPLOAD_MB,
                                "MAX_PIXELS": MAX_PIXELS_DEFAULT, "OOD_TOLERANCE": 1.0,
                                "MAX_DECODED_MB": MAX_DECODED_BYTES_DEFAULT / limits.MIB,
                                "DECODE_SLOTS": limits.DEFAULT_DECODE_SLOTS}
    names = dict.fromkeys(settings, "")
    for key in settings:
        variable = f"COVID_XRAY_{key}"
        if variable in os.environ:
            settings[key], names[key] = os.environ[variable], variable
    settings.update({"SERVICE": None, "MAX_FORM_MEMORY_SIZE": limits.MAX_FORM_FIELD_BYTES,
                     "MAX_FORM_PARTS": limits.MAX_FORM_PARTS})
    for key, value in (config or {}).items():
        settings[key], names[key] = value, f"config {key}"
    for key, check in _CHECKS.items():
        settings[key] = check(settings[key], names[key] or key)
    return settings


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build the app and load the models once (warmed up); a bad model file raises at once.

    ``config`` keys: ``MODELS_DIR``, ``MAX_UPLOAD_MB`` (413 beyond it), ``MAX_PIXELS`` (decoded
    pixel cap, 400 beyond it), ``MAX_DECODED_MB`` (decoder-output cap in MiB, 400 beyond it),
    ``DECODE_SLOTS`` (large decodes at once), ``OOD_TOLERANCE`` (scales the feature-distance
    limit),
    ``SERVICE`` (an already loaded :class:`PredictionService`, so tests and the benchmark do not
    reload models), plus any Flask setting (``MAX_FORM_MEMORY_SIZE`` and ``MAX_FORM_PARTS``
    default to :mod:`~covid_xray.serving.settings`' limits).
    """
    settings = _settings(config)
    app = Flask(__name__)
    app.config.update({k: v for k, v in settings.items() if k != "SERVICE"})
    app.config["MAX_CONTENT_LENGTH"] = int(settings["MAX_UPLOAD_MB"] * 1024 * 1024)
    app.json.sort_keys = False
    service = settings["SERVICE"] or PredictionService.load(
        settings["MODELS_DIR"], max_pixels=settings["MAX_PIXELS"],
        ood_tolerance=settings["OOD_TOLERANCE"],
        max_bytes=limits.decoded_bytes_cap(settings["MAX_DECODED_MB"]),
        decode_slots=settings["DECODE_SLOTS"])
    app.extensions[SERVICE_KEY] = service
    _register_routes(app)
    _register_errors(app)
    return app


def _service() -> PredictionService:
    return current_app.extensions[SERVICE_KEY]


def _error(status: int, message: str) -> tuple[Response, int]:
    return jsonify({"error": message, "status": status}), status


def _read_upload() -> bytes:
    """The image bytes from a multipart field ``file`` or, otherwise, the raw request body.

    Above ``MAX_CONTENT_LENGTH`` Flask raises 413 before reading anything. A multipart body is
    read into memory first (it is below that limit), so when Werkzeug's parser refuses it (one
    413 for several causes) or silently drops what it cannot parse, :func:`_multipart_problem`
    can name the cause from the same bytes.
    """
    if request.mimetype == "multipart/form-data":
        boundary = request.mimetype_params.get("boundary")
        if not boundary:
            raise InputError("malformed multipart body: the Content-Type header declares no "
                             "boundary; let the client library build the request (curl -F "
                             "file=@xray.jpeg)")
        if not boundary.isascii():
            raise InputError("malformed multipart body: the boundary in the Content-Type header "
                             "is not ASCII")
        body = request.get_data(cache=True)
        try:
            files, form = request.files, request.form
        except RequestEntityTooLarge as exc:
            raise _multipart_problem(body, boundary) or InputError(
                "malformed multipart body: no part boundary or end of part headers within "
                f"{current_app.config['MAX_FORM_MEMORY_SIZE']:,} bytes") from exc
        upload = files.get("file")
        if upload is not None:
            return upload.read()
        if "file" in form:
            raise InputError("multipart field 'file' is a plain form field, not a file part: "
                             "send the image as a file (curl -F file=@xray.jpeg)")
        names = ", ".join(repr(name) for name in [*files, *form]) or "none"
        raise _multipart_problem(body, boundary) or InputError(
            f"no multipart file field named 'file' (fields sent: {names}): send the image as "
            "multipart field 'file' (or as the raw request body)")
    if request.mimetype == "application/x-www-form-urlencoded":
        raise InputError("a form-encoded body cannot carry an image: send it as multipart "
                         "field 'file' or as the raw request body", 415)
    return request.get_data(cache=False)


_UNFINISHED = {State.PREAMBLE: "the boundary declared in the Content-Type header never starts a "
                               "part",
               State.PART: "a part's headers never end (no blank line)",
               State.DATA_START: "the body ends inside a part (no closing boundary)",
               State.DATA: "the body ends inside a part (no closing boundary)"}


def _multipart_problem(body: bytes, boundary: str) -> InputError | None:
    """A multipart body's first fault: a field or parts limit crossed (413) or malformed (400).

    Werkzeug raises one 413 for several limits and drops malformed parts silently. This replays
    the body (in memory, below the upload limit) through Werkzeug's own sans-IO decoder without
    limits, checking them in Werkzeug's order. ``None``: well-formed and within the limits.
    """
    field_limit = int(current_app.config["MAX_FORM_MEMORY_SIZE"])
    parts_limit = int(current_app.config["MAX_FORM_PARTS"])
    decoder = MultipartDecoder(boundary.encode("ascii"))
    decoder.receive_data(body)
    decoder.receive_data(None)
    parts, field, size = 0, None, 0
    try:
        while not isinstance(event := decoder.next_event(), Epilogue):
            if isinstance(event, Field | File):
                parts += 1
                if parts > parts_limit:
                    return InputError(f"too many multipart parts: more than {parts_limit}; send "
                                      "only the field 'file'", 413)
                field, size = (event.name if isinstance(event, Field) else None), 0
            elif isinstance(event, Data) and field is not None:
                size += len(event.data)
                if size > field_limit:
                    return InputError(
                        f"multipart field {field!r} is a plain form field larger than the "
                        f"{field_limit:,} bytes allowed for one: send the image as a file part "
                        "(curl -F file=@xray.jpeg)", 413)
    except ValueError as exc:  # "Invalid form-data cannot parse beyond State.X", or a bad part
        unfinished = "cannot parse beyond" in str(exc)
        reason = _UNFINISHED.get(decoder.state, str(exc)) if unfinished else str(exc)
        return InputError(f"malformed multipart body: {reason}", 400)
    return None


def _register_routes(app: Flask) -> None:
    @app.get("/")
    def index() -> str:
        service = _service()
        models = [{"name": m.name, "demo": m.info.trained_on_demo,
                   "trained_on": m.info.trained_on}
                  for m in service.models]
        return render_template("index.html", disclaimer=DISCLAIMER,
                               max_upload_mb=app.config["MAX_UPLOAD_MB"], models=models)

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
        size = request.content_length
        sent = f"{size / 1024 / 1024:.2f} MB sent, " if size else ""
        return _error(413, f"upload too large: {sent}the limit is "
                           f"{app.config['MAX_UPLOAD_MB']:g} MB")

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> tuple[Response, int]:
        return _error(exc.code or 500, exc.description or exc.name)

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> tuple[Response, int]:
        log.exception("unexpected error on %s %s", request.method, request.path)
        return _error(500, "internal error while processing the request; see the server log")
