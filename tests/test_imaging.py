"""The one preprocessing path: every input flavour becomes the same RGB uint8 pixels."""

from __future__ import annotations

import io
import struct
import tracemalloc
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from covid_xray import ood
from covid_xray.imaging import (
    JPEG_REDUCE_MIN_SIDE,
    MAX_PIXELS_DEFAULT,
    ImageDecodeError,
    ImageRejected,
    decode_checked,
    decode_image,
    decoded_bytes,
    jpeg_scale,
    load_image,
    prepare_file,
    prepare_image,
    read_image_info,
    resize_square,
    rotate,
    to_rgb8,
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


# -- issue 10, items 10, 12, 13: the one checked decode ------------------------------------------


def _film(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth grey image (film-like: the image-level checks accept it)."""
    noise = np.random.default_rng(seed).normal(size=(height, width)).astype(np.float32)
    smooth = cv2.GaussianBlur(noise, (0, 0), max(2.0, min(height, width) / 40))
    return cv2.normalize(smooth, None, 20, 235, cv2.NORM_MINMAX).astype(np.uint8)


def _jpeg(array: np.ndarray, **params: int) -> bytes:
    flags = [item for pair in params.items() for item in (getattr(cv2, pair[0]), pair[1])]
    ok, buf = cv2.imencode(".jpg", array, flags)
    assert ok
    return buf.tobytes()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (struct.pack(">I", len(payload)) + kind + payload
            + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))


def zero_png(width: int, height: int, bit_depth: int = 16, colour_type: int = 6) -> bytes:
    """A real, complete PNG of zeros, built row by row (never the whole array in memory).

    ``colour_type`` 6 = RGBA: a 7000 x 7000 16-bit one is ~0.4 MB on disk, 392 MB decoded.
    """
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour_type]
    row = b"\0" * (1 + width * channels * bit_depth // 8)
    packer = zlib.compressobj(9)
    body = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", body)
            + _png_chunk(b"IEND", b""))


def _reason(data: bytes, **limits: int) -> str:
    with pytest.raises(ImageRejected) as caught:
        decode_checked(data, **limits)
    return caught.value.reason


def test_jpeg_cut_in_half_with_an_end_marker_is_truncated() -> None:
    """OpenCV and Pillow decode this silently (grey lower half); libjpeg warns, so we refuse."""
    data = _jpeg(_film(256, 300))
    cut = data[: len(data) // 2] + b"\xff\xd9"
    assert cv2.imdecode(np.frombuffer(cut, np.uint8), cv2.IMREAD_UNCHANGED) is not None
    with pytest.raises(ImageDecodeError, match="truncated JPEG data") as caught:
        decode_image(cut)
    assert caught.value.reason == "truncated"
    assert _reason(data[: len(data) // 2]) == "truncated"  # no end marker at all


def test_real_sample_jpeg_cut_in_half_with_an_end_marker_is_truncated(xray_sample: Path) -> None:
    for path in sorted(xray_sample.rglob("*.jp*g"))[:10]:
        data = path.read_bytes()
        assert _reason(data[: len(data) // 2] + b"\xff\xd9") == "truncated", path


def test_corrupt_jpeg_data_is_refused_and_padding_warnings_are_not() -> None:
    data = bytearray(_jpeg(_film(128, 160, seed=3)))
    start = data.index(b"\xff\xda") + 20
    data[start: start + 40] = bytes(range(40))  # scrambled entropy-coded data
    assert _reason(bytes(data)) in ("corrupt", "truncated")
    clean = _jpeg(_film(128, 160, seed=4))
    table = clean.index(b"\xff\xdb")
    padded = clean[:table] + b"\0\0\0" + clean[table:]  # libjpeg: "3 extraneous bytes"
    assert np.array_equal(decode_checked(padded), decode_checked(clean))


def test_truncated_and_corrupt_png_are_named() -> None:
    data = _png(_film(120, 150))
    assert _reason(data[: len(data) // 2]) == "truncated"
    idat = data.index(b"IDAT")
    short = data[: idat - 4] + _png_chunk(b"IDAT", data[idat + 4: idat + 200]) \
        + _png_chunk(b"IEND", b"")
    assert _reason(short) == "truncated"  # a complete file structure, image data cut
    flipped = bytearray(data)
    flipped[idat + 60] ^= 0xFF  # CRC no longer matches
    assert _reason(bytes(flipped)) == "corrupt"


def test_decoded_bytes_cap_refuses_a_small_16bit_rgba_bomb_before_decoding() -> None:
    bomb = zero_png(7000, 7000)
    assert len(bomb) < 1_500_000 and MAX_PIXELS_DEFAULT > 7000 * 7000  # passed the old caps
    info = read_image_info(bomb)
    assert (info.width, info.bit_depth, info.mode) == (7000, 16, "RGBA")
    assert decoded_bytes(info) == 7000 * 7000 * 4 * 2
    with pytest.raises(ImageDecodeError, match=r"374 MiB once decoded, above the limit of "
                                               r"128 MiB") as caught:
        decode_image(bomb)
    assert caught.value.reason == "too_large"
    small = zero_png(300, 200)
    assert decode_image(small).shape == (200, 300, 3)
    assert _reason(small, max_bytes=300 * 200 * 8 - 1) == "too_large"


def test_declared_decompression_bomb_is_too_large_not_not_image() -> None:
    header_only = (b"\x89PNG\r\n\x1a\n"
                   + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0))
                   + _png_chunk(b"IEND", b""))
    assert _reason(header_only) == "too_large"


def test_16bit_rgba_is_converted_exactly_without_whole_image_float_copies() -> None:
    rng = np.random.default_rng(0)
    bgra = rng.integers(0, 65536, (1500, 1200, 4), dtype=np.uint16)
    reference = (bgra[:4].astype(np.float64) / 257).round()  # the first rows, the slow way
    alpha = (reference[..., 3:4] / 255.0).astype(np.float32)
    expected = (reference[..., :3].astype(np.float32) * alpha).round().astype(np.uint8)[..., ::-1]
    tracemalloc.start()
    rgb = to_rgb8(bgra)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert np.array_equal(rgb[:4], expected)
    # output (5.4 MB) + one band of temporaries; whole-image float32 copies were 3 x 29 MB
    assert peak < rgb.nbytes + 12 * 2**20, peak


def test_large_jpegs_are_decoded_at_reduced_scale_in_the_dct_domain() -> None:
    grey = _film(2100, 2300, seed=5)
    data = _jpeg(grey)
    info = read_image_info(data)
    assert jpeg_scale(info) == 2 and decoded_bytes(info) == 1050 * 1150
    rgb = decode_image(data)
    assert rgb.shape == (1050, 1150, 3)
    reduced = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_REDUCED_GRAYSCALE_2)
    assert np.array_equal(rgb[..., 0], reduced)  # libjpeg's own 1/2-scale IDCT
    below = _jpeg(grey[: JPEG_REDUCE_MIN_SIDE * 2 - 1])
    assert decode_image(below).shape == (2047, 2300, 3)  # below 2 x 1024 px: full size
    assert jpeg_scale(read_image_info(_jpeg(_film(320, 256)))) == 1  # demo data: full size


def test_jpeg_pixels_equal_opencv_on_the_demo_data(tmp_path: Path) -> None:
    """The committed demo metrics cannot move: the JPEG decoder gives OpenCV's pixels."""
    from covid_xray.demo import generate_demo
    from covid_xray.params import DemoParams

    generate_demo(tmp_path, DemoParams(covid_patients=6, kermany_train=8, kermany_test=2,
                                       max_side=320), seed=42, progress=False)
    files = sorted(p for p in tmp_path.rglob("*") if p.suffix in (".jpg", ".jpeg", ".png"))
    assert len(files) > 30
    for path in files:
        decoded = cv2.imdecode(np.fromfile(path, np.uint8),
                               cv2.IMREAD_UNCHANGED | cv2.IMREAD_IGNORE_ORIENTATION)
        assert np.array_equal(load_image(path), to_rgb8(decoded)), path
        decode_checked(path.read_bytes())  # and the data stages keep every one


def test_jpeg_pixels_equal_opencv_on_the_real_sample(xray_sample: Path) -> None:
    checked = 0
    for path in sorted(xray_sample.rglob("*")):
        if path.suffix.lower() not in (".jpg", ".jpeg", ".png"):
            continue
        data = path.read_bytes()
        rgb = decode_checked(data)  # no real X-ray of the sample is refused
        if jpeg_scale(read_image_info(data)) == 1:
            decoded = cv2.imdecode(np.frombuffer(data, np.uint8),
                                   cv2.IMREAD_UNCHANGED | cv2.IMREAD_IGNORE_ORIENTATION)
            assert np.array_equal(rgb, to_rgb8(decoded)), path
            checked += 1
    assert checked >= 60


@pytest.mark.parametrize(("make", "reason"), [
    (lambda: np.full((1, 1, 3), 128, np.uint8), "too_small"),
    (lambda: _film(20, 400), "too_small"),
    (lambda: np.random.default_rng(0).integers(0, 256, (200, 200, 3), np.uint8), "colour"),
    (lambda: np.repeat(np.random.default_rng(0).integers(0, 256, (200, 200, 1), np.uint8), 3,
                       axis=2), "noise"),
    (lambda: np.full((100, 100, 3), 90, np.uint8), "blank"),
])
def test_decode_checked_applies_the_servers_image_checks(make, reason: str) -> None:
    rgb = make()
    assert _reason(_png(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))) == reason
    assert ood.check_image(rgb).reason == reason  # the server's own check, same name
    assert reason in ood.IMAGE_REASONS
