"""Decoded image inputs of queued jobs, stored with the job so a job survives a restart.

Images are fetched and decoded when a request is submitted (a bad URL is a 400 then, not a
FAILED job later). What the job later runs on is exactly that decoded uint8 ``[H, W, 3]``
array: it is stored with the job as ``.npy`` bytes (:func:`pixels_to_bytes`; in the SQLite
database or in a Redis hash beside the job record, deleted when the job finishes), and the
stored job parameters hold ``{"stored_input": "<param>.npy"}`` in place of the URL or base64
text. Whichever worker takes the job reads them back (:func:`pixels_from_bytes`). Re-fetching
the URL after a restart instead could give another picture or none (expired signed URLs).
Why ``.npy`` and not the original bytes or a PNG: the image is decoded through Pillow exactly
once, at submission (where it must be, to refuse a bad image with a 400), and the job runs on
those very pixels; a PNG would add an encode at submit and a decode at run time, the original
bytes a second full decode. The price is size (3 bytes a pixel, uncompressed) for as long as
the job waits; ``np.load(allow_pickle=False)`` reads plain arrays only, never objects.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import numpy as np

STORED_INPUT = "stored_input"
"""Key of the reference object that replaces an image parameter in stored job params."""


class InputsLost(RuntimeError):
    """A queued job's stored inputs are missing (e.g. deleted by hand or a crash mid-submit)."""


def stored_reference(name: str) -> dict[str, str]:
    return {STORED_INPUT: f"{name}.npy"}


def pixels_to_bytes(image: np.ndarray, name: str) -> bytes:
    """One decoded input image as ``.npy`` bytes (what the job store keeps with the job)."""
    buf = io.BytesIO()
    np.save(buf, _checked_pixels(image, name), allow_pickle=False)
    return buf.getvalue()


def pixels_from_bytes(stored: Mapping[str, bytes], params: Mapping[str, Any],
                      names: tuple[str, ...]) -> dict[str, np.ndarray | None]:
    """The images of a job's image parameters ``names`` from its stored ``.npy`` blobs (keyed by name)."""
    images: dict[str, np.ndarray | None] = {}
    for name in names:
        ref = params.get(name)
        if ref is None:
            images[name] = None
            continue
        data = stored.get(name)
        if data is None:
            raise InputsLost(f"the stored input image for {name!r} is missing")
        try:
            images[name] = _checked_pixels(np.load(io.BytesIO(data), allow_pickle=False), name)
        except (OSError, ValueError) as exc:
            raise InputsLost(f"the stored input image for {name!r} is unreadable ({exc})") from None
    return images


def _checked_pixels(image: np.ndarray, name: str) -> np.ndarray:
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3):
        shape = getattr(image, "shape", None)
        raise ValueError(f"stored input {name!r} is not a uint8 [H, W, 3] image (got {type(image).__name__} {shape})")
    return image
