"""Decoded image inputs of queued ``/v2`` jobs, kept on disk so a job survives a restart.

Images are fetched and decoded when a request is submitted (a bad URL is a 400 then, not a
FAILED job later). What the job later runs on is exactly that decoded uint8 ``[H, W, 3]``
array: it is written as ``<data dir>/inputs/<job id>/<param>.npy`` and the stored job
parameters hold ``{"stored_input": "<param>.npy"}`` in place of the URL or base64 text.
Re-fetching the URL after a restart instead could give another picture or none (expired
signed URLs), and keeping multi-megabyte base64 strings in the job database would bloat it.
Why ``.npy`` and not the original bytes or a PNG: the image is decoded through Pillow exactly
once, at submission (where it must be, to refuse a bad image with a 400), and the job runs on
those very pixels; a PNG would add an encode at submit and a decode at run time, the original
bytes a second full decode. The price is size on disk (3 bytes a pixel, uncompressed) for as
long as the job waits; ``np.load(allow_pickle=False)`` reads plain arrays only, never objects.

On the Redis store (scale-out) the same ``.npy`` bytes (:func:`pixels_to_bytes`) travel with
the job record instead, so whichever worker takes the job reads them (:func:`pixels_from_bytes`).

Files are staged under ``.staging-<uuid>`` and renamed to the job id once the job row exists;
they are deleted when the job finishes, and a periodic sweep removes directories whose job is
gone or finished and stale staging directories (left by a crash between the two steps).
"""

from __future__ import annotations

import io
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from api.jobs import is_job_id

logger = logging.getLogger(__name__)

STORED_INPUT = "stored_input"
"""Key of the reference object that replaces an image parameter in stored job params."""

_STAGING_PREFIX = ".staging-"
_FILE_RE = re.compile(r"^[A-Za-z0-9_]{1,64}\.npy$")


class InputsLost(RuntimeError):
    """A queued job's stored inputs are missing (e.g. deleted by hand or a crash mid-submit)."""


def stored_reference(name: str) -> dict[str, str]:
    return {STORED_INPUT: f"{name}.npy"}


class InputStore:
    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def stage(self, images: Mapping[str, np.ndarray]) -> Path:
        """Write uint8 ``[H, W, 3]`` ``images`` to a new staging directory (blocking: run in a thread)."""
        staging = self.root / f"{_STAGING_PREFIX}{uuid.uuid4().hex}"
        staging.mkdir()
        try:
            for name, image in images.items():
                if not _FILE_RE.match(f"{name}.npy"):
                    raise ValueError(f"invalid image parameter name {name!r}")
                with open(staging / f"{name}.npy", "wb") as fh:
                    np.save(fh, _checked_pixels(image, name), allow_pickle=False)
                    fh.flush()
                    os.fsync(fh.fileno())
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return staging

    def commit(self, staging: Path, job_id: str) -> None:
        os.replace(staging, self._job_dir(job_id))

    def discard(self, staging: Path) -> None:
        shutil.rmtree(staging, ignore_errors=True)

    def load(self, job_id: str, params: Mapping[str, Any], names: tuple[str, ...]) -> dict[str, np.ndarray | None]:
        """uint8 ``[H, W, 3]`` images for the image parameters ``names`` of a stored job (blocking)."""
        images: dict[str, np.ndarray | None] = {}
        for name in names:
            ref = params.get(name)
            if ref is None:
                images[name] = None
                continue
            filename = ref.get(STORED_INPUT) if isinstance(ref, dict) else None
            if not isinstance(filename, str) or not _FILE_RE.match(filename):
                raise InputsLost(f"stored parameter {name!r} does not reference a stored image")
            path = self._job_dir(job_id) / filename
            try:
                pixels = np.load(path, allow_pickle=False)
            except FileNotFoundError:
                raise InputsLost(f"the stored input image for {name!r} is missing") from None
            except (OSError, ValueError) as exc:  # truncated or not an .npy file
                raise InputsLost(f"the stored input image for {name!r} is unreadable ({exc})") from None
            try:
                images[name] = _checked_pixels(pixels, name)
            except ValueError as exc:
                raise InputsLost(str(exc)) from None
        return images

    def delete(self, job_id: str) -> None:
        shutil.rmtree(self._job_dir(job_id), ignore_errors=True)

    def sweep(self, is_pending: Callable[[str], bool], staging_max_age_s: float = 3600.0) -> int:
        """Remove inputs of jobs that are not pending any more and old staging dirs (blocking)."""
        removed = 0
        now = time.time()
        for entry in self.root.iterdir():
            if not entry.is_dir():
                continue
            if entry.name.startswith(_STAGING_PREFIX):
                stale = now - entry.stat().st_mtime > staging_max_age_s
            else:
                stale = is_job_id(entry.name) and not is_pending(entry.name)
            if stale:
                shutil.rmtree(entry, ignore_errors=True)
                removed += 1
        if removed:
            logger.info("removed %d stale input directories", removed)
        return removed

    def _job_dir(self, job_id: str) -> Path:
        if not is_job_id(job_id):
            raise ValueError(f"invalid job id {job_id!r}")
        return self.root / job_id


def pixels_to_bytes(image: np.ndarray, name: str) -> bytes:
    """One decoded input image as ``.npy`` bytes (what the Redis store keeps with the job)."""
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
