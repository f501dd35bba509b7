"""Image decoding and preprocessing: the ONE implementation used by copy_images, featurize, train,
evaluate, validate, audit, probe, the web app and the CLI, so serving sees exactly the pixels
training saw, and the data stages skip exactly the images the server refuses.

Recipe: decode -> RGB -> :func:`model_view` (``params.preprocess``: crop_border -> grayscale ->
equalize -> resize -> replicate to 3 channels; the seed's stretch by default) -> scale to [0, 1].
Decoding goes by the file's bytes (never its extension) and normalises grayscale, RGBA, 16-bit
and CMYK inputs to 8-bit RGB. Every refusal is an :class:`ImageRejected` with a machine reason
(``skipped.csv``, ``metrics/copy_images.json``, the API's error) and a one-line message:

- ``empty``, ``not_image``: nothing decodable;
- ``too_large``: above the pixel cap or the decoded-bytes cap, judged from the header alone,
  before any pixel is decoded (decompression bombs: a 1.5 MB 7000x7000 16-bit RGBA PNG is
  392 MB decoded);
- ``truncated``: the data ends before the image does (libjpeg's "premature end" warnings, libpng's
  "not enough image data"), even when an end marker was appended;
- ``corrupt``: anything else the decoder refuses or warns about (bad Huffman code, CRC error);
- the image-level reasons of :func:`covid_xray.ood.check_image` (``too_small``, ``colour``,
  ``blank``, ``document``, ``noise``), applied by :func:`decode_checked`.

JPEGs are decoded by libjpeg-turbo through ``simplejpeg`` in strict mode: OpenCV and Pillow decode a
JPEG cut in half with an end marker appended silently, with a grey lower half, and only print
libjpeg's warning to stderr; ``simplejpeg`` raises it. Same library as OpenCV's (libjpeg-turbo
3.1, accurate integer IDCT, fancy upsampling): identical pixels on every file of the real sample
and the demo data (tests/test_imaging.py). Large JPEGs are decoded at reduced scale in the DCT
domain (see :func:`jpeg_scale`). Other formats go through OpenCV, which refuses truncated and
corrupt PNG data (libpng errors); Pillow then names the cause.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import simplejpeg
from PIL import Image, UnidentifiedImageError

from covid_xray import ood
from covid_xray.params import Preprocessing

MAX_PIXELS_DEFAULT = 50_000_000
"""Images above this many pixels are refused before decoding (decompression bombs)."""
MAX_DECODED_BYTES_DEFAULT = 128 * 1024 * 1024
"""Images whose decoder output (width x height x channels x bytes per channel, at the scale they
are decoded at) would exceed this are refused before decoding. 128 MiB admits any 8-bit grey image
up to the pixel cap, 8-bit RGB up to 44 Mpx, 16-bit grey up to 67 Mpx."""
JPEG_REDUCE_MIN_SIDE = 1024
"""JPEGs are decoded at 1/2, 1/4 or 1/8 scale as long as the shorter side stays at or above this
(>= 4.5x the 224 px model input, 4x the 256 px analysis size of the image checks)."""
JPEG_SCALES: tuple[int, ...] = (8, 4, 2, 1)
REJECT_REASONS: tuple[str, ...] = ("empty", "not_image", "too_large", "truncated", "corrupt")
"""Decode-level reasons; :data:`covid_xray.ood.IMAGE_REASONS` lists the image-level ones."""

_GREY_MODES = frozenset({"1", "L", "I", "F", "I;16", "I;16B", "I;16L", "I;16N"})
_COLOUR_MODES = frozenset({"RGB", "YCbCr", "LAB", "HSV"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})
_BAND_VALUES = 1 << 20
"""Values (pixels x channels) per band of :func:`to_rgb8`: its float32 temporaries stay ~4 MiB."""

_JPEG_TRUNCATED = ("premature end",)
"""libjpeg warnings meaning the data stops early (JWRN_JPEG_EOF, JWRN_HIT_MARKER)."""
_JPEG_BENIGN = ("extraneous bytes before marker", "unknown jfif revision",
                "unknown adobe color transform", "bad icc marker",
                "invalid sos parameters for sequential jpeg")
"""libjpeg warnings about metadata or padding, not pixels: such files decode as libjpeg intends
(as OpenCV decoded them before), without strict mode."""


class ImageRejected(ValueError):
    """An image the server and the data stages refuse; ``reason`` is the machine name."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class ImageDecodeError(ImageRejected):
    """The bytes are not a usable image: a reason of :data:`REJECT_REASONS`."""


@dataclass(frozen=True)
class ImageInfo:
    """What the file header says, read without decoding the pixels."""

    format: str
    width: int
    height: int
    mode: str
    bit_depth: int
    progressive: bool = False


def read_image_info(data: bytes) -> ImageInfo:
    """Sniff format and size from the header (cheap; no pixel decoding)."""
    if not data:
        raise ImageDecodeError("empty", "empty file")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            mode = image.mode
            fmt = (image.format or "unknown").lower()
            progressive = bool(image.info.get("progressive"))
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError("too_large", f"declared size too large ({exc})") from exc
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ImageDecodeError(
            "not_image", f"not a recognised image format ({exc.__class__.__name__})") from exc
    if fmt == "mpo":  # a camera's multi-picture JPEG: its first picture is a plain JPEG
        fmt = "jpeg"
    bit_depth = 16 if mode in _SIXTEEN_BIT_MODES else 8
    if fmt == "png" and data[24:25] == b"\x10":  # IHDR bit depth (Pillow reads RGB(A)/16 as 8)
        bit_depth = 16
    return ImageInfo(format=fmt, width=width, height=height, mode=mode, bit_depth=bit_depth,
                     progressive=progressive)


def jpeg_scale(info: ImageInfo) -> int:
    """Denominator of the scale a JPEG is decoded at: 8, 4, 2 or 1 (full size).

    The largest reduction that keeps the shorter side at or above :data:`JPEG_REDUCE_MIN_SIDE`;
    other formats, and JPEGs whose shorter side is below twice that, are decoded at full size.
    Training and serving both decode through here, so both see the same pixels.
    """
    if info.format != "jpeg":
        return 1
    shorter = min(info.width, info.height)
    return next(s for s in JPEG_SCALES if s == 1 or shorter // s >= JPEG_REDUCE_MIN_SIDE)


def decoded_bytes(info: ImageInfo) -> int:
    """Memory the decoder needs for this image, from its header alone (an upper bound).

    Output array: width x height (at :func:`jpeg_scale`) x channels x bytes per channel.
    Progressive JPEGs also hold every DCT coefficient of the full-size image while decoding
    (2 bytes per pixel per component), whatever the output scale.
    """
    if info.mode in _GREY_MODES:
        channels = 1
    elif info.mode in _COLOUR_MODES:
        channels = 3
    else:  # alpha, palette (may carry transparency), CMYK
        channels = 4
    per_channel = 4 if info.mode == "F" else 2 if info.bit_depth == 16 else 1
    scale = jpeg_scale(info)
    out = math.ceil(info.width / scale) * math.ceil(info.height / scale) * channels * per_channel
    if info.format == "jpeg" and info.progressive:
        out += info.width * info.height * min(channels, 3) * 2
    return out


def check_limits(info: ImageInfo, max_pixels: int = MAX_PIXELS_DEFAULT,
                 max_bytes: int = MAX_DECODED_BYTES_DEFAULT) -> int:
    """Raise ``too_large`` above either cap; returns :func:`decoded_bytes` otherwise."""
    pixels = info.width * info.height
    if pixels > max_pixels:
        raise ImageDecodeError(
            "too_large", f"image is {info.width}x{info.height} = {pixels:,} pixels, above the "
            f"limit of {max_pixels:,}")
    needed = decoded_bytes(info)
    if needed > max_bytes:
        raise ImageDecodeError(
            "too_large", f"image is {info.width}x{info.height} {info.mode} "
            f"({info.bit_depth}-bit): {needed / 2**20:,.0f} MiB once decoded, above the limit "
            f"of {max_bytes / 2**20:,.0f} MiB")
    return needed


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS_DEFAULT,
                 max_bytes: int = MAX_DECODED_BYTES_DEFAULT) -> np.ndarray:
    """Decode image bytes to an ``(H, W, 3)`` uint8 RGB array (large JPEGs at reduced scale).

    Raises :class:`ImageDecodeError` (reason ``empty``, ``not_image``, ``too_large``,
    ``truncated`` or ``corrupt``); the caps are checked on the header, before decoding.
    """
    info = read_image_info(data)
    check_limits(info, max_pixels, max_bytes)
    if info.format == "jpeg":
        pixels = _decode_jpeg(data, info)
        if pixels is not None:
            return pixels
    decoded = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), _opencv_flags(info))
    if decoded is None or decoded.size == 0:
        reason, cause = _failure_reason(data)
        if reason == "truncated":
            raise ImageDecodeError(reason, f"truncated {info.format.upper()} data ({cause}): "
                                           "the file ends before the image does")
        raise ImageDecodeError(reason, f"corrupt {info.format.upper()} data ({cause})")
    return to_rgb8(decoded, cmyk=info.mode == "CMYK")


def _decode_jpeg(data: bytes, info: ImageInfo) -> np.ndarray | None:
    """libjpeg-turbo, strict: a warning about the pixel data is a refusal.

    Returns None for OpenCV to decode instead: CMYK/YCCK files (after this strict pass, in CMYK),
    and files whose only warning is about metadata or padding (``simplejpeg`` raises every
    warning it meets in the header, strict or not; OpenCV decodes them as it always did).
    """
    scale = jpeg_scale(info)
    size = {"min_height": math.ceil(info.height / scale),
            "min_width": math.ceil(info.width / scale)} if scale > 1 else {}
    space = {"L": "GRAY", "CMYK": "CMYK"}.get(info.mode, "RGB")
    try:
        pixels = simplejpeg.decode_jpeg(data, colorspace=space, strict=True, **size)
    except ValueError as exc:
        message = str(exc)
        lowered = message.lower()
        if any(text in lowered for text in _JPEG_BENIGN):
            return None
        if any(text in lowered for text in _JPEG_TRUNCATED):
            raise ImageDecodeError("truncated", f"truncated JPEG data ({message}): the file "
                                                "ends before the image does") from exc
        raise ImageDecodeError("corrupt", f"corrupt JPEG data ({message})") from exc
    if space == "GRAY":
        return cv2.cvtColor(pixels, cv2.COLOR_GRAY2RGB)
    return None if space == "CMYK" else pixels


def _opencv_flags(info: ImageInfo) -> int:
    """Everything as stored (depth, alpha), or a JPEG at its :func:`jpeg_scale` (3 channels)."""
    reduced = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
               8: cv2.IMREAD_REDUCED_COLOR_8}.get(jpeg_scale(info))
    return (reduced or cv2.IMREAD_UNCHANGED) | cv2.IMREAD_IGNORE_ORIENTATION


def _failure_reason(data: bytes) -> tuple[str, str]:
    """Why OpenCV could not decode: Pillow's full decode names it (only on this error path)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except (OSError, ValueError, SyntaxError) as exc:
        text = str(exc)
        return ("truncated" if "truncated" in text.lower() else "corrupt"), text
    return "corrupt", "OpenCV refused the data"


def to_rgb8(decoded: np.ndarray, cmyk: bool = False) -> np.ndarray:
    """Normalise an OpenCV-decoded array (any depth, 1/3/4 channels, BGR order) to RGB uint8.

    Converted in bands of rows into one preallocated output, so memory beyond the input and the
    output stays ~10 MiB whatever the image size (float32 copies of a whole 16-bit image took
    several times its size: 2.5 GB for a 7000 x 7000 RGBA one).
    """
    if decoded.dtype not in (np.uint8, np.uint16, np.float32, np.float64):
        raise ImageDecodeError("corrupt", f"unsupported pixel type {decoded.dtype}")
    image = decoded[:, :, np.newaxis] if decoded.ndim == 2 else decoded
    height, width, channels = image.shape
    if channels not in (1, 3, 4):
        raise ImageDecodeError("corrupt", f"unsupported channel count {channels}")
    out = np.empty((height, width, 3), dtype=np.uint8)
    rows = max(1, _BAND_VALUES // max(1, width * channels))
    for top in range(0, height, rows):
        out[top:top + rows] = _band_to_rgb8(image[top:top + rows], cmyk)
    return out


def _band_to_rgb8(band: np.ndarray, cmyk: bool) -> np.ndarray:
    """One band of :func:`to_rgb8`; float work in place, one temporary at a time."""
    if band.dtype == np.uint16:
        scaled = band.astype(np.float32)
        scaled /= 257.0
        band = np.round(scaled, out=scaled).astype(np.uint8)
    elif band.dtype in (np.float32, np.float64):
        scaled = np.clip(band, 0.0, 1.0)
        scaled *= 255.0
        band = np.round(scaled, out=scaled).astype(np.uint8)
    channels = band.shape[2]
    if channels == 1:
        return cv2.cvtColor(band[:, :, 0], cv2.COLOR_GRAY2RGB)
    if channels == 3:
        return cv2.cvtColor(band, cv2.COLOR_BGR2RGB)
    if cmyk:  # OpenCV gives CMYK JPEG 4-channel only on some builds
        return cv2.cvtColor(np.ascontiguousarray(band[:, :, :3]), cv2.COLOR_BGR2RGB)
    # alpha: composite over black, as a viewer would show an X-ray film
    bgr = band[:, :, :3].astype(np.float32)
    alpha = band[:, :, 3:4].astype(np.float32)
    alpha /= 255.0
    bgr *= alpha
    return cv2.cvtColor(np.round(bgr, out=bgr).astype(np.uint8), cv2.COLOR_BGR2RGB)


def decode_checked(data: bytes, max_pixels: int = MAX_PIXELS_DEFAULT,
                   max_bytes: int = MAX_DECODED_BYTES_DEFAULT) -> np.ndarray:
    """:func:`decode_image` plus the server's image-level checks (:func:`ood.check_image`).

    What the data stages keep: exactly the images the server would decode and not refuse before
    the models run. Raises :class:`ImageRejected` with the decode or image-level reason.
    """
    rgb = decode_image(data, max_pixels=max_pixels, max_bytes=max_bytes)
    check = ood.check_image(rgb)
    if not check.ok:
        raise ImageRejected(check.reason, check.message)
    return rgb


def load_image(path: Path | str, max_pixels: int = MAX_PIXELS_DEFAULT,
               max_bytes: int = MAX_DECODED_BYTES_DEFAULT) -> np.ndarray:
    """Read and decode a file; errors name the file."""
    path = Path(path)
    try:
        return decode_image(path.read_bytes(), max_pixels=max_pixels, max_bytes=max_bytes)
    except ImageDecodeError as exc:
        raise ImageDecodeError(exc.reason, f"{path}: {exc}") from exc


def resize_square(rgb: np.ndarray, img_size: int) -> np.ndarray:
    """Resize to ``img_size`` x ``img_size`` (aspect not kept, as in the seed); uint8 out."""
    interpolation = cv2.INTER_AREA if min(rgb.shape[:2]) > img_size else cv2.INTER_LINEAR
    return cv2.resize(rgb, (img_size, img_size), interpolation=interpolation)


def rotate(rgb: np.ndarray, angle_deg: float) -> np.ndarray:
    """Rotate about the centre, edges filled by replication (the seed's ``fill_mode='nearest'``)."""
    height, width = rgb.shape[:2]
    matrix = cv2.getRotationMatrix2D((width / 2.0, height / 2.0), angle_deg, 1.0)
    return cv2.warpAffine(rgb, matrix, (width, height), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REPLICATE)


def to_model_input(resized_rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB (..., S, S, 3) -> float32 in [0, 1], the models' input."""
    return resized_rgb.astype(np.float32) / 255.0


# ---------------------------------------------------------------------------------------------
# Preprocessing: decoded RGB -> what the model sees (``params.preprocess``, the models' sidecars)

DEFAULT_PREPROCESSING = Preprocessing()
"""The seed's recipe: decode -> RGB -> stretch to the square -> [0, 1]."""

Box = tuple[int, int, int, int]
"""``(top, bottom, left, right)``, bottom and right exclusive."""


@dataclass(frozen=True)
class ViewGeometry:
    """Which part of a decoded image the model sees, and where it lands in the model input.

    ``source`` is a box of the decoded image (after ``crop_border`` and ``center_crop``); it is
    resized onto ``target``, a box of the ``img_size`` square (the whole square, except inside
    ``pad``'s bars). The Grad-CAM overlay maps the model's heatmap back with it.
    """

    source: Box
    target: Box


def view_geometry(height: int, width: int, img_size: int,
                  preprocessing: Preprocessing = DEFAULT_PREPROCESSING) -> ViewGeometry:
    """The boxes of :class:`ViewGeometry` for a decoded ``height`` x ``width`` image."""
    dy = min(round(height * preprocessing.crop_border), (height - 1) // 2)
    dx = min(round(width * preprocessing.crop_border), (width - 1) // 2)
    top, bottom, left, right = dy, height - dy, dx, width - dx
    h, w = bottom - top, right - left
    if preprocessing.resize == "center_crop":
        side = min(h, w)
        top, left = top + (h - side) // 2, left + (w - side) // 2
        bottom, right = top + side, left + side
    target: Box = (0, img_size, 0, img_size)
    if preprocessing.resize == "pad":
        scale = img_size / max(h, w)
        th, tw = max(1, min(img_size, round(h * scale))), max(1, min(img_size, round(w * scale)))
        y0, x0 = (img_size - th) // 2, (img_size - tw) // 2
        target = (y0, y0 + th, x0, x0 + tw)
    return ViewGeometry(source=(top, bottom, left, right), target=target)


def _equalize(pixels: np.ndarray, preprocessing: Preprocessing) -> np.ndarray:
    """Histogram equalisation or CLAHE of the grey level.

    A colour image (``grayscale: false``) is equalised on the Y of YCrCb, its chroma kept: Y is
    exactly the grey ``grayscale: true`` uses (OpenCV's BT.601 luma, which maps a grey pixel to
    itself), so a grey film gives the same model input with or without ``grayscale``.
    """
    if preprocessing.equalize == "hist":
        def level(grey: np.ndarray) -> np.ndarray:
            return cv2.equalizeHist(grey)
    else:
        clahe = cv2.createCLAHE(clipLimit=preprocessing.clahe_clip,
                                tileGridSize=(preprocessing.clahe_tile,) * 2)

        def level(grey: np.ndarray) -> np.ndarray:
            return clahe.apply(grey)
    if pixels.ndim == 2:
        return level(np.ascontiguousarray(pixels))
    ycrcb = cv2.cvtColor(pixels, cv2.COLOR_RGB2YCrCb)
    ycrcb[:, :, 0] = level(np.ascontiguousarray(ycrcb[:, :, 0]))
    return cv2.cvtColor(ycrcb, cv2.COLOR_YCrCb2RGB)


def model_view(rgb: np.ndarray, img_size: int,
               preprocessing: Preprocessing = DEFAULT_PREPROCESSING,
               angle_deg: float = 0.0) -> np.ndarray:
    """Decoded uint8 RGB -> the model's view, uint8 ``(S, S, 3)``: THE preprocessing function.

    crop_border -> grayscale -> equalize -> resize (stretch | pad | center_crop) -> rotate (the
    cached augmentation copies only) -> replicate to 3 channels. With the defaults this is the
    seed's stretch, bit for bit. ``pad`` fills with black (0): air is black on a radiograph, so the
    bars look like the film's own background (they still show the aspect ratio; ``center_crop``
    does not, at the cost of the lateral edges).
    """
    return model_views(rgb, (img_size,), preprocessing, angle_deg)[0]


def model_views(rgb: np.ndarray, sizes: Sequence[int],
                preprocessing: Preprocessing = DEFAULT_PREPROCESSING,
                angle_deg: float = 0.0) -> list[np.ndarray]:
    """:func:`model_view` at several sizes, the steps before the resize done once (the probe
    measures statistics at the model's size and runs a backbone at a smaller one)."""
    top, bottom, left, right = view_geometry(rgb.shape[0], rgb.shape[1], 1, preprocessing).source
    pixels = rgb[top:bottom, left:right]
    if preprocessing.grayscale:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY)
    if preprocessing.equalize != "none":
        pixels = _equalize(pixels, preprocessing)
    views = []
    for img_size in sizes:
        if preprocessing.resize == "pad":
            y0, y1, x0, x1 = view_geometry(rgb.shape[0], rgb.shape[1], img_size,
                                           preprocessing).target
            shrinking = (y1 - y0) < pixels.shape[0] or (x1 - x0) < pixels.shape[1]
            resized = cv2.resize(pixels, (x1 - x0, y1 - y0),
                                 interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
            view = np.zeros((img_size, img_size, *pixels.shape[2:]), dtype=np.uint8)
            view[y0:y1, x0:x1] = resized
        else:
            view = resize_square(pixels, img_size)
        if angle_deg:
            view = rotate(view, angle_deg)
        if view.ndim == 2:
            view = cv2.cvtColor(view, cv2.COLOR_GRAY2RGB)
        views.append(view)
    return views


def prepare_rgb(rgb: np.ndarray, img_size: int,
                preprocessing: Preprocessing = DEFAULT_PREPROCESSING,
                angle_deg: float = 0.0) -> np.ndarray:
    """Decoded uint8 RGB -> model input ``(S, S, 3)`` float32 in [0, 1] (:func:`model_view`)."""
    return to_model_input(model_view(rgb, img_size, preprocessing, angle_deg))


def prepare_image(data: bytes, img_size: int,
                  preprocessing: Preprocessing = DEFAULT_PREPROCESSING,
                  max_pixels: int = MAX_PIXELS_DEFAULT) -> np.ndarray:
    """Bytes -> model input ``(S, S, 3)`` float32: exactly what training saw."""
    return prepare_rgb(decode_image(data, max_pixels=max_pixels), img_size, preprocessing)


def prepare_file(path: Path | str, img_size: int, angle_deg: float = 0.0,
                 preprocessing: Preprocessing = DEFAULT_PREPROCESSING) -> np.ndarray:
    """File -> model input, optionally rotated (the cached augmentation copies)."""
    return prepare_rgb(load_image(path), img_size, preprocessing, angle_deg)
