"""The one preprocessing path: every input flavour becomes the same RGB uint8 pixels."""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from covid_xray.imaging import (
    ImageDecodeError,
    decode_image,
    load_image,
    prepare_file,
    prepare_image,
    read_image_info,
    resize_square,
    rotate,
)


def _grey(height: int = 40, width: int = 30) -> np.ndarray:
    ramp = np.linspace(0, 255, width, dtype=np.float32)[None, :].repeat(height, 0)
    return ramp.astype(np.uint8)


def _png(array: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", array)
    assert ok
    return buf.tobytes()


def test_grayscale_rgba_and_16bit_png_decode_to_the_same_grey() -> None:
    grey = _grey()
    expected = np.repeat(grey[:, :, None], 3, axis=2)
    assert np.array_equal(decode_image(_png(grey)), expected)
    rgba = np.dstack([grey, grey, grey, np.full_like(grey, 255)])
    assert np.array_equal(decode_image(_png(rgba)), expected)
    sixteen = grey.astype(np.uint16) * 257
    assert np.array_equal(decode_image(_png(sixteen)), expected)
    assert read_image_info(_png(sixteen)).bit_depth == 16


def test_bgr_becomes_rgb() -> None:
    bgr = np.zeros((8, 8, 3), np.uint8)
    bgr[:, :, 0] = 200  # blue in OpenCV order
    assert decode_image(_png(bgr))[0, 0].tolist() == [0, 0, 200]


def test_cmyk_jpeg_is_converted() -> None:
    buffer = io.BytesIO()
    Image.new("CMYK", (16, 16), (0, 0, 0, 0)).save(buffer, format="JPEG")  # white in CMYK
    rgb = decode_image(buffer.getvalue())
    assert rgb.shape == (16, 16, 3)
    assert rgb.mean() > 240


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"%PDF-1.4 not an image", "not a recognised image"),
    ],
)
def test_non_images_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(ImageDecodeError, match=message):
        decode_image(data)


def test_truncated_jpeg_is_refused() -> None:
    ok, buf = cv2.imencode(".jpg", _grey(64, 64))
    assert ok
    with pytest.raises(ImageDecodeError, match="truncated"):
        decode_image(buf.tobytes()[: len(buf) // 2])


def test_pixel_cap_refuses_before_decoding() -> None:
    with pytest.raises(ImageDecodeError, match="above the limit"):
        decode_image(_png(_grey(100, 100)), max_pixels=5_000)


def test_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "scan.jpeg"
    bad.write_bytes(b"garbage")
    with pytest.raises(ImageDecodeError, match=r"scan\.jpeg"):
        load_image(bad)


def test_prepare_file_and_prepare_image_agree(tmp_path: Path) -> None:
    path = tmp_path / "x.png"
    data = _png(_grey(50, 70))
    path.write_bytes(data)
    from_file = prepare_file(path, 32)
    from_bytes = prepare_image(data, 32)
    assert from_file.dtype == np.float32 and from_file.shape == (32, 32, 3)
    assert np.array_equal(from_file, from_bytes)
    assert from_file.min() >= 0.0 and from_file.max() <= 1.0


def test_rotation_keeps_shape_and_changes_pixels() -> None:
    image = resize_square(np.repeat(_grey(64, 64)[:, :, None], 3, axis=2), 32)
    turned = rotate(image, 15)
    assert turned.shape == image.shape
    assert not np.array_equal(turned, image)
    assert np.array_equal(rotate(image, 0), image)
