"""Encoding generated images to the formats the API returns (png, jpeg, webp)."""

from __future__ import annotations

import io

import numpy as np
import PIL.Image

CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
DEFAULT_QUALITY = 95


def encode_image(pixels: np.ndarray, fmt: str = "png", quality: int = DEFAULT_QUALITY) -> bytes:
    """uint8 [H, W, 3] -> encoded bytes; ``quality`` applies to jpeg and webp."""
    fmt = fmt.lower()
    if fmt == "jpg":
        fmt = "jpeg"
    if fmt not in CONTENT_TYPES:
        raise ValueError(f"unsupported output format {fmt!r}; choose one of {', '.join(CONTENT_TYPES)}")
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected uint8 [H, W, 3] pixels, got {pixels.dtype} {pixels.shape}")
    buf = io.BytesIO()
    options = {} if fmt == "png" else {"quality": int(quality)}
    PIL.Image.fromarray(pixels).save(buf, format=fmt.upper(), **options)
    return buf.getvalue()
