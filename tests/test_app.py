"""Every route and every bad input of the Flask app, with Flask's test client and real models."""

from __future__ import annotations

import io
import os
import re
import struct
import tempfile
import uuid
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import film_sized, sample_dir
from flask import Flask
from flask.testing import FlaskClient
from PIL import Image
from sklearn.datasets import load_sample_image
from test_predict import trained_on

from covid_xray.config import MODEL_NAMES
from covid_xray.modeling import ModelLoadError
from covid_xray.predict import PredictionService
from covid_xray.serving.app import create_app
from covid_xray.serving.settings import SettingError
from covid_xray.testing import demo_images_by_class


@pytest.fixture(scope="module")
def app(service: PredictionService) -> Flask:
    return create_app({"SERVICE": service, "MAX_UPLOAD_MB": 4, "TESTING": True})


@pytest.fixture()
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture(scope="module")
def xray_rgb() -> np.ndarray:
    """A grey chest X-ray as RGB: a real one from the sample when present, else a demo image."""
    sample = sample_dir()
    if sample is not None:
        path = sorted((sample / "chest_xray" / "test" / "PNEUMONIA").glob("*.jpeg"))[0]
        rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        return cv2.resize(rgb, (640, 480), interpolation=cv2.INTER_AREA)
    return film_sized(demo_images_by_class(per_class=1, seed=11)["pneumonia"][0])


def pil_bytes(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def xray_jpeg(xray_rgb: np.ndarray) -> bytes:
    return pil_bytes(Image.fromarray(xray_rgb), "JPEG", quality=92)


def post_file(client: FlaskClient, data: bytes, filename: str = "x.jpg", query: str = ""):
    return client.post(f"/api/predict{query}", data={"file": (io.BytesIO(data), filename)},
                       content_type="multipart/form-data")


def assert_json_error(response, status: int, pattern: str) -> None:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.is_json
    body = response.get_json()
    assert set(body) == {"error", "status"} and body["status"] == status
    assert re.search(pattern, body["error"], re.IGNORECASE), body["error"]
    assert "Traceback" not in response.get_data(as_text=True)


def probabilities(body: dict) -> dict[str, dict[str, float]]:
    return {name: answer["probabilities"] for name, answer in body["models"].items()}


# -- routes --------------------------------------------------------------------------------------


def test_page_has_picker_drop_zone_disclaimer_and_no_external_assets(client: FlaskClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    assert 'type="file"' in html and 'data-testid="drop-zone"' in html
    assert "not a diagnostic device" in html.lower()
    assert 'name="viewport"' in html
    for name in MODEL_NAMES:
        assert f'data-model="{name}"' in html
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert assets and all(a.startswith("/static/") for a in assets), assets
    for asset in assets:
        body = client.get(asset)
        assert body.status_code == 200
        assert not re.search(r"https?://", body.get_data(as_text=True)), asset
    assert "Content-Security-Policy" in page.headers


def test_healthz_reports_loaded_models(client: FlaskClient, service: PredictionService) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    body = response.get_json()
    assert body["status"] == "ok" and set(body["models"]) == set(MODEL_NAMES)
    for model in service.models:
        entry = body["models"][model.name]
        assert entry["training_source"] == model.info.training_source != "unknown"
        assert entry["training_data"] == model.info.training_data != ""


def test_page_shows_what_each_model_was_trained_on(service: PredictionService) -> None:
    """Under each model: its training data, flagged when it is the synthetic demo data."""
    def page(source: str, text: str) -> str:
        models = [trained_on(m, source, text) for m in service.models]
        app = create_app({"SERVICE": PredictionService(models), "TESTING": True})
        return app.test_client().get("/").get_data(as_text=True)

    demo = page("demo", "synthetic demo images (data.source=demo), never a real X-ray")
    real = page("local:collections", "the X-ray collections in the local folder collections/")
    unrecorded = page("unknown", "")
    assert 'data-testid="demo-note"' in demo and "These models were" in demo
    assert 'data-testid="demo-note"' not in real + unrecorded
    for name in MODEL_NAMES:
        assert re.search(rf'<p class="source demo" data-testid="source-{name}">Trained on '
                         r"synthetic demo images \(data\.source=demo\), never a real X-ray</p>",
                         demo), demo
        assert re.search(rf'<p class="source" data-testid="source-{name}">Trained on the X-ray '
                         "collections in the local folder collections/</p>", real), real
        assert re.search(rf'data-testid="source-{name}">Trained on data not recorded', unrecorded)


def test_demo_models_refusal_names_the_cause_in_the_json(service: PredictionService,
                                                         xray_jpeg: bytes) -> None:
    distance = max(service.predict_bytes(xray_jpeg)["checks"]["features"].values())
    demo = PredictionService([trained_on(m, "demo") for m in service.models],
                             ood_tolerance=distance / 2)
    body = post_file(create_app({"SERVICE": demo}).test_client(), xray_jpeg).get_json()
    assert body["refused_by"] == "features"
    assert "synthetic demo images" in body["message"]
    assert "dvc exp run -S data.source=download" in body["message"]


def test_predict_multipart(client: FlaskClient, xray_jpeg: bytes) -> None:
    response = post_file(client, xray_jpeg)
    assert response.status_code == 200
    body = response.get_json()
    assert body["in_distribution"] is True
    for name in MODEL_NAMES:
        answer = body["models"][name]
        assert answer["label"] in ("POSITIVE", "NEGATIVE")
        assert answer["version"]["sha256"] and answer["threshold"] == 0.5
    assert body["timing_ms"]["request"] >= body["timing_ms"]["total"] > 0


def test_raw_body_gives_the_same_numbers(client: FlaskClient, xray_jpeg: bytes) -> None:
    multipart = post_file(client, xray_jpeg).get_json()
    for content_type in ("image/jpeg", "application/octet-stream", "image/png"):
        raw = client.post("/api/predict", data=xray_jpeg, content_type=content_type)
        assert raw.status_code == 200  # the content decides, not the declared type
        assert probabilities(raw.get_json()) == probabilities(multipart)


def test_gradcam_query_returns_overlays(client: FlaskClient, xray_jpeg: bytes) -> None:
    body = post_file(client, xray_jpeg, query="?gradcam=1").get_json()
    assert body["preview"].startswith("data:image/jpeg;base64,")
    for name in MODEL_NAMES:
        assert body["models"][name]["gradcam"].startswith("data:image/jpeg;base64,")


def test_file_name_and_extension_do_not_matter(client: FlaskClient, xray_jpeg: bytes) -> None:
    reference = probabilities(post_file(client, xray_jpeg).get_json())
    for name in ("scan.png", "notes.txt", "noextension", "../../etc/passwd"):
        response = post_file(client, xray_jpeg, filename=name)
        assert response.status_code == 200 and probabilities(response.get_json()) == reference


def test_upload_is_never_written_under_the_client_file_name(client: FlaskClient,
                                                            xray_jpeg: bytes) -> None:
    name = f"client-chosen-{uuid.uuid4().hex}.jpeg"
    noise = np.random.default_rng(0).integers(0, 256, (1500, 1500), dtype=np.uint8)
    big = pil_bytes(Image.fromarray(noise), "PNG")  # above werkzeug's in-memory part size
    assert len(big) > 1024 * 1024
    assert post_file(client, big, filename=name).status_code == 200
    assert name not in post_file(client, xray_jpeg, filename=name).get_data(as_text=True)
    for root in {Path(tempfile.gettempdir()), Path.cwd()}:
        for _, _, files in os.walk(root):
            assert name not in files


def test_refused_image_gets_200_with_message_and_no_verdict(client: FlaskClient) -> None:
    photo = pil_bytes(Image.fromarray(load_sample_image("china.jpg")), "JPEG")
    body = post_file(client, photo).get_json()
    assert body["in_distribution"] is False and "colour" in body["message"]
    assert all(a["label"] is None for a in body["models"].values())


def test_unknown_route_and_wrong_method_are_json(client: FlaskClient) -> None:
    assert_json_error(client.get("/nope"), 404, "not found")
    assert_json_error(client.get("/api/predict"), 405, "method")


# -- formats are converted correctly ---------------------------------------------------------------


def test_grayscale_rgba_16bit_and_cmyk_are_converted(client: FlaskClient,
                                                     xray_rgb: np.ndarray) -> None:
    grey = xray_rgb[:, :, 0]
    reference = probabilities(post_file(client, pil_bytes(Image.fromarray(xray_rgb),
                                                          "PNG")).get_json())
    exact = {
        "grayscale PNG": pil_bytes(Image.fromarray(grey, "L"), "PNG"),
        "RGBA PNG": pil_bytes(Image.fromarray(np.dstack([xray_rgb, np.full_like(grey, 255)]),
                                              "RGBA"), "PNG"),
        "16-bit PNG": cv2.imencode(".png", grey.astype(np.uint16) * 257)[1].tobytes(),
    }
    for kind, data in exact.items():
        response = post_file(client, data)
        assert response.status_code == 200, kind
        body = response.get_json()
        assert body["in_distribution"] is True, kind
        assert probabilities(body) == reference, kind
    cmyk = pil_bytes(Image.fromarray(xray_rgb).convert("CMYK"), "JPEG", quality=95)
    body = post_file(client, cmyk).get_json()
    assert body["image"]["mode"] == "CMYK" and body["in_distribution"] is True
    assert body["checks"]["image"]["colourfulness"] < 3  # still grey: channels not mixed up
    for name, probs in probabilities(body).items():
        assert probs["covid"] == pytest.approx(reference[name]["covid"], abs=0.1)


def test_transparent_rgba_is_composited_not_garbage(client: FlaskClient,
                                                    xray_rgb: np.ndarray) -> None:
    alpha = np.full(xray_rgb.shape[:2], 255, np.uint8)
    alpha[:, : xray_rgb.shape[1] // 10] = 0  # transparent strip: shown as black film edge
    response = post_file(client, pil_bytes(Image.fromarray(np.dstack([xray_rgb, alpha]),
                                                           "RGBA"), "PNG"))
    assert response.status_code == 200 and response.get_json()["in_distribution"] is True


# -- bad input: JSON errors, never a 500 ---------------------------------------------------------


def test_size_limit_is_configurable_and_answers_413(service: PredictionService,
                                                    xray_jpeg: bytes) -> None:
    small = create_app({"SERVICE": service, "MAX_UPLOAD_MB": 0.02}).test_client()
    assert len(xray_jpeg) > 0.02 * 1024 * 1024
    assert_json_error(post_file(small, xray_jpeg), 413, r"too large.*0\.02 MB")
    assert_json_error(small.post("/api/predict", data=xray_jpeg, content_type="image/jpeg"),
                      413, "too large")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` but that carries almost no data."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (struct.pack(">I", len(payload)) + kind + payload
                + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b""))


def test_decompression_bombs_are_refused(client: FlaskClient) -> None:
    real_bomb = pil_bytes(Image.new("L", (8000, 8000)), "PNG")  # 64 Mpx of zeros, tiny file
    assert len(real_bomb) < 200_000
    assert_json_error(post_file(client, real_bomb), 400, "pixels, above the limit")
    assert_json_error(post_file(client, png_header_only(100_000, 100_000)), 400, "too large")


def test_pixel_cap_is_configurable(service: PredictionService, xray_jpeg: bytes) -> None:
    capped = create_app({"SERVICE": PredictionService(service.models, max_pixels=100_000)})
    assert_json_error(post_file(capped.test_client(), xray_jpeg), 400, "above the limit")


@pytest.mark.parametrize(("data", "status", "pattern"), [
    (b"", 400, "empty"),
    (b"%PDF-1.4 this is a document, not an image", 415, "not an image"),
    (b"GIF89a" + b"\x00" * 10, 415, "not an image"),
    (b"\x00" * 5000, 415, "not an image"),
])
def test_non_images_and_empty_bodies(client: FlaskClient, data: bytes, status: int,
                                     pattern: str) -> None:
    assert_json_error(post_file(client, data), status, pattern)
    assert_json_error(client.post("/api/predict", data=data,
                                  content_type="application/octet-stream"), status, pattern)


def test_request_without_body_is_400(client: FlaskClient) -> None:
    assert_json_error(client.post("/api/predict"), 400, "empty")


def test_truncated_jpeg_is_400(client: FlaskClient, xray_jpeg: bytes) -> None:
    assert_json_error(post_file(client, xray_jpeg[: len(xray_jpeg) // 2]), 400, "truncated")


def test_corrupt_png_is_400(client: FlaskClient, xray_rgb: np.ndarray) -> None:
    png = bytearray(pil_bytes(Image.fromarray(xray_rgb), "PNG"))
    png[200:260] = b"\xff" * 60  # scrambled compressed data
    assert_json_error(post_file(client, bytes(png)), 400, "cannot use this png")


def multipart(*parts: tuple[str, str | None, bytes], boundary: str = "XYZ") -> bytes:
    """A multipart/form-data body from (field name, file name or None for a plain field, data)."""
    body = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"'
                                                     if filename else "")
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data
        body += b"\r\n"
    return body + f"--{boundary}--\r\n".encode()


BIG = bytes(range(256)) * 3000  # 768,000 bytes: above Werkzeug's 500,000-byte buffer limits


@pytest.mark.parametrize(("content_type", "body", "status", "pattern"), [
    ("multipart/form-data", b"--x\r\nno boundary declared", 400,
     "malformed multipart body: the Content-Type header declares no boundary"),
    ("multipart/form-data; boundary*=UTF-8''%E2%82%AC",  # RFC 2231: the boundary is a euro sign
     multipart(("file", "a.jpg", b"\xff"), boundary="\u20ac"), 400,
     "malformed multipart body: the boundary in the Content-Type header is not ASCII"),
    ("multipart/form-data; boundary=XYZ", b"this is not multipart at all", 400,
     "malformed multipart body: the boundary declared in the Content-Type header never starts"),
    ("multipart/form-data; boundary=WRONG", multipart(("file", "a.jpg", BIG)), 400,
     "malformed multipart body: the boundary declared in the Content-Type header never starts"),
    ("multipart/form-data; boundary=XYZ",
     b'--XYZ\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n'
     b"Content-Type: image/jpeg\r\n\r\n\xff\xd8\xff\xe0 cut off before the closing boundary",
     400, "malformed multipart body: the body ends inside a part"),
    ("multipart/form-data; boundary=XYZ", b"--XYZ\r\nX-Other: 1\r\n\r\ndata\r\n--XYZ--\r\n",
     400, "malformed multipart body: Missing Content-Disposition header"),
    ("multipart/form-data; boundary=XYZ", multipart(("other", None, b"value")), 400,
     r"no multipart file field named 'file' \(fields sent: 'other'\)"),
    ("multipart/form-data; boundary=XYZ", multipart(("file", None, b"\xff\xd8 image bytes")),
     400, "'file' is a plain form field, not a file part"),
    ("multipart/form-data; boundary=XYZ", multipart(("file", None, BIG)), 413,
     "'file' is a plain form field larger than the 500,000 bytes allowed"),
    ("multipart/form-data; boundary=XYZ",
     multipart(*[(f"note{i}", None, b"x") for i in range(20)], ("file", "a.jpg", b"\xff")), 413,
     "too many multipart parts: more than 16"),
], ids=["no boundary", "non-ASCII boundary", "not multipart", "wrong boundary, 768 kB",
        "cut off", "no disposition", "other field", "small plain field", "large plain field",
        "20 parts"])
def test_multipart_errors_name_the_true_cause(client: FlaskClient, content_type: str,
                                              body: bytes, status: int, pattern: str) -> None:
    """Werkzeug raises one 413 for several causes and drops what it cannot parse; the API
    names the cause (a wrong boundary used to get "too large: the limit is 4 MB")."""
    assert len(body) < 4 * 1024 * 1024  # never the upload limit
    response = client.post("/api/predict", data=body, content_type=content_type)
    assert_json_error(response, status, pattern)


def test_multipart_file_part_still_works_next_to_small_fields(client: FlaskClient,
                                                              xray_jpeg: bytes) -> None:
    body = multipart(("note", None, b"x"), ("file", "scan.jpeg", xray_jpeg))
    response = client.post("/api/predict", data=body,
                           content_type="multipart/form-data; boundary=XYZ")
    assert response.status_code == 200
    assert probabilities(response.get_json()) == probabilities(post_file(client,
                                                                         xray_jpeg).get_json())


def test_form_encoded_body_is_415(client: FlaskClient) -> None:
    response = client.post("/api/predict", data={"file": "not a file"})
    assert_json_error(response, 415, "multipart field 'file'")


# -- start-up ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("variable", "value", "pattern"), [
    ("COVID_XRAY_MAX_UPLOAD_MB", "nan", "COVID_XRAY_MAX_UPLOAD_MB must be a finite number"),
    ("COVID_XRAY_MAX_UPLOAD_MB", "-1", "COVID_XRAY_MAX_UPLOAD_MB must be above 0"),
    ("COVID_XRAY_MAX_PIXELS", "0", "COVID_XRAY_MAX_PIXELS must be from 65,536"),
    ("COVID_XRAY_OOD_TOLERANCE", "nan", "COVID_XRAY_OOD_TOLERANCE must be a finite number"),
    ("COVID_XRAY_MAX_DECODED_MB", "0.5", "COVID_XRAY_MAX_DECODED_MB must be from 1 to 16384"),
    ("COVID_XRAY_MAX_DECODED_MB", "lots", "COVID_XRAY_MAX_DECODED_MB must be a number"),
    ("COVID_XRAY_DECODE_SLOTS", "0", "COVID_XRAY_DECODE_SLOTS must be from 1 to 64"),
    ("COVID_XRAY_DECODE_SLOTS", "1.5", "COVID_XRAY_DECODE_SLOTS must be a whole number"),
])
def test_flask_run_settings_are_validated_naming_the_variable(
        variable: str, value: str, pattern: str, models_dir: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The same checks as ``serve``'s options, for ``flask run``'s environment variables."""
    monkeypatch.setenv("COVID_XRAY_MODELS_DIR", str(models_dir))
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingError, match=pattern):
        create_app()


def test_app_refuses_to_start_without_models(tmp_path: Path) -> None:
    (tmp_path / "covid_normal.json").write_text("{}")
    with pytest.raises(ModelLoadError, match=r"covid_normal\.keras"):
        create_app({"MODELS_DIR": str(tmp_path)})


def test_flask_run_finds_the_factory_and_reads_the_environment(
        models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``flask --app covid_xray.serving.app run`` (development) builds the same app."""
    from flask.cli import ScriptInfo

    monkeypatch.setenv("COVID_XRAY_MODELS_DIR", str(models_dir))
    monkeypatch.setenv("COVID_XRAY_MAX_UPLOAD_MB", "3")
    monkeypatch.setenv("COVID_XRAY_MAX_DECODED_MB", "2")
    monkeypatch.setenv("COVID_XRAY_DECODE_SLOTS", "3")
    app = ScriptInfo(app_import_path="covid_xray.serving.app").load_app()
    assert app.config["MAX_CONTENT_LENGTH"] == 3 * 1024 * 1024
    client = app.test_client()
    health = client.get("/healthz").get_json()
    assert health["status"] == "ok"
    assert health["limits"]["max_decoded_bytes"] == 2 * 1024 * 1024
    assert health["limits"]["decode_slots"] == 3
    # the decoded-bytes cap is the service's: a 1,600 x 1,600 grey PNG (2.4 MiB) is refused
    assert_json_error(post_file(client, zero_png(1600, 1600, bit_depth=8, colour_type=0)), 400,
                      r"MiB once decoded, above the limit of 2 MiB")


# -- issue 10: truncated data, decoded-bytes cap, bounded large decodes, image-level reasons ------


def zero_png(width: int, height: int, bit_depth: int = 16, colour_type: int = 6) -> bytes:
    """A complete PNG of zeros built row by row (16-bit RGBA by default: tiny file, huge decode)."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (struct.pack(">I", len(payload)) + kind + payload
                + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour_type]
    row = b"\0" * (1 + width * channels * bit_depth // 8)
    packer = zlib.compressobj(9)
    body = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body)
            + chunk(b"IEND", b""))


def test_jpeg_cut_in_half_with_an_end_marker_is_400(client: FlaskClient,
                                                    xray_jpeg: bytes) -> None:
    cut = xray_jpeg[: len(xray_jpeg) // 2] + b"\xff\xd9"  # decodes silently with a grey half
    assert_json_error(post_file(client, cut), 400, r"truncated JPEG data .*premature end")


def test_small_16bit_rgba_bomb_is_refused_by_its_decoded_size(client: FlaskClient) -> None:
    bomb = zero_png(7000, 7000)  # 0.4 MB upload, under the pixel cap, 374 MiB decoded
    assert_json_error(post_file(client, bomb), 400, r"374 MiB once decoded, above the limit")


def test_one_pixel_image_is_refused_as_too_small(client: FlaskClient) -> None:
    body = post_file(client, pil_bytes(Image.new("L", (1, 1), 128), "PNG")).get_json()
    assert body["in_distribution"] is False and body["refused_by"] == "too_small"
    assert all(a["label"] is None for a in body["models"].values())


def test_large_decodes_wait_for_a_slot_and_small_ones_never_do(
        service: PredictionService, xray_jpeg: bytes) -> None:
    bounded = PredictionService(service.models, decode_slots=1, decode_wait_s=0.2)
    client = create_app({"SERVICE": bounded}).test_client()
    large = zero_png(1500, 1500)  # 17 MiB decoded: above LARGE_DECODE_BYTES
    assert bounded.decode_slots.acquire(timeout=1)  # another large decode holds the only slot
    try:
        assert_json_error(post_file(client, large), 503, "busy decoding other large images")
        assert post_file(client, xray_jpeg).status_code == 200  # an ordinary X-ray: no wait
    finally:
        bounded.decode_slots.release()
    response = post_file(client, large)
    assert response.status_code == 200 and response.get_json()["refused_by"] == "blank"


def test_serving_code_holds_no_stand_in_models() -> None:
    """The stand-in builders live in ``covid_xray.testing``, not in the code that serves."""
    import covid_xray.cli
    import covid_xray.predict
    import covid_xray.serving.app
    import covid_xray.testing

    stand_ins = ("build_smoke_models", "ensure_smoke_models", "demo_images_by_class",
                 "sample_images_by_class", "SMOKE_CLASSES")
    for module in (covid_xray.predict, covid_xray.serving.app, covid_xray.cli):
        assert not [name for name in stand_ins if hasattr(module, name)], module.__name__
    assert all(callable(getattr(covid_xray.testing, name)) for name in stand_ins[:4])
