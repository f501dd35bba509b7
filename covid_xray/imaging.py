"""Image decoding and preprocessing: the ONE implementation used by featurize, train, evaluate,
validate, the web app and the CLI, so serving sees exactly the pixels training saw.

Recipe (the seed's): decode -> RGB -> resize to ``img_size`` x ``img_size`` -> scale to [0, 1].
Decoding goes through OpenCV on the file's bytes (never its extension) and normalises grayscale,
RGBA, 16-bit and CMYK inputs to 8-bit RGB.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

MAX_PIXELS_DEFAULT = 50_000_000
"""Images above this many pixels are refused before decoding (decompression bombs)."""


class ImageDecodeError(ValueError):
    """The bytes are not a decodable image (or exceed the pixel cap)."""


@dataclass(frozen=True)
class ImageInfo:
    """What the file header says, read without decoding the pixels."""

    format: str
    width: int
    height: int
    mode: str
    bit_depth: int


def read_image_info(data: bytes) -> ImageInfo:
    """Sniff format and size from the header (cheap; no pixel decoding)."""
    if not data:
        raise ImageDecodeError("empty file")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            mode = image.mode
            fmt = (image.format or "unknown").lower()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(f"not a recognised image format ({exc.__class__.__name__})") from exc
    bit_depth = 16 if mode in ("I;16", "I;16B", "I;16L", "I") else 8
    return ImageInfo(format=fmt, width=width, height=height, mode=mode, bit_depth=bit_depth)


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS_DEFAULT) -> np.ndarray:
    """Decode image bytes to an ``(H, W, 3)`` uint8 RGB array.

    Raises :class:`ImageDecodeError` for empty, non-image, truncated or oversized input.
    """
    info = read_image_info(data)
    if info.width * info.height > max_pixels:
        raise ImageDecodeError(
            f"image is {info.width}x{info.height} = {info.width * info.height:,} pixels, "
            f"above the limit of {max_pixels:,}")
    if info.format == "jpeg" and b"\xff\xd9" not in data[-1024:]:
        raise ImageDecodeError("truncated JPEG (no end-of-image marker)")
    array = np.frombuffer(data, dtype=np.uint8)
    decoded = cv2.imdecode(array, cv2.IMREAD_UNCHANGED | cv2.IMREAD_IGNORE_ORIENTATION)
    if decoded is None or decoded.size == 0:
        raise ImageDecodeError(f"could not decode the {info.format} data (corrupt or truncated)")
    return to_rgb8(decoded, cmyk=info.mode == "CMYK")


def to_rgb8(decoded: np.ndarray, cmyk: bool = False) -> np.ndarray:
    """Normalise an OpenCV-decoded array (any depth, 1/3/4 channels, BGR order) to RGB uint8."""
    image = decoded
    if image.dtype == np.uint16:
        image = (image.astype(np.float32) / 257.0).round().astype(np.uint8)
    elif image.dtype in (np.float32, np.float64):
        image = (np.clip(image, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    elif image.dtype != np.uint8:
        raise ImageDecodeError(f"unsupported pixel type {image.dtype}")
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    channels = image.shape[2]
    if channels == 1:
        return cv2.cvtColor(image[:, :, 0], cv2.COLOR_GRAY2RGB)
    if channels == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if channels == 4 and cmyk:  # OpenCV gives CMYK JPEG 4-channel only on some builds
        return cv2.cvtColor(image[:, :, :3], cv2.COLOR_BGR2RGB)
    if channels == 4:  # alpha: composite over black, as a viewer would show an X-ray film
        bgr = image[:, :, :3].astype(np.float32)
        alpha = image[:, :, 3:4].astype(np.float32) / 255.0
        return cv2.cvtColor((bgr * alpha).round().astype(np.uint8), cv2.COLOR_BGR2RGB)
    raise ImageDecodeError(f"unsupported channel count {channels}")


def load_image(path: Path | str, max_pixels: int = MAX_PIXELS_DEFAULT) -> np.ndarray:
    """Read and decode a file; errors name the file."""
    path = Path(path)
    try:
        return decode_image(path.read_bytes(), max_pixels=max_pixels)
    except ImageDecodeError as exc:
        raise ImageDecodeError(f"{path}: {exc}") from exc


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


def prepare_image(data: bytes, img_size: int, max_pixels: int = MAX_PIXELS_DEFAULT) -> np.ndarray:
    """Bytes -> model input ``(S, S, 3)`` float32: exactly what training saw."""
    return to_model_input(resize_square(decode_image(data, max_pixels=max_pixels), img_size))


def prepare_file(path: Path | str, img_size: int, angle_deg: float = 0.0) -> np.ndarray:
    """File -> model input, optionally rotated first (the cached augmentation copies)."""
    resized = resize_square(load_image(path), img_size)
    if angle_deg:
        resized = rotate(resized, angle_deg)
    return to_model_input(resized)
